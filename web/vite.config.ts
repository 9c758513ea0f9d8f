// The playground is built into the Python package (src/imagegate/playground_dist, ignored by git)
// so that `imagegate serve` finds it next to its own code; scripts/setup runs this build.
import { defineConfig } from "vite";

export default defineConfig({
  // Relative URLs: the page works wherever imagegate is mounted (behind a proxy under a sub-path too).
  base: "./",
  oxc: { jsx: { runtime: "automatic", importSource: "preact" } },
  build: {
    outDir: "../src/imagegate/playground_dist",
    emptyOutDir: true,
    // Served by imagegate at /static/<name>, content-hashed and cached for a year.
    assetsDir: "static",
    // Small files stay files: an inlined data: URL would need a looser Content-Security-Policy.
    assetsInlineLimit: 0,
    sourcemap: false,
    reportCompressedSize: false,
  },
});
