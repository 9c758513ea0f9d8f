#!/usr/bin/env node
// Compiles contracts/TestUSDC.sol with the pinned npm `solc` (solc-js: no native binary, works offline)
// and writes src/imagegate/contracts/TestUSDC.json, the artifact the Python dev chain installs.
//
//   node scripts/compile_contracts.mjs           write the artifact
//   node scripts/compile_contracts.mjs --check   exit 1 if the committed artifact differs from a fresh build
//
// Output is deterministic: fixed settings, a fixed source unit name, no absolute paths, and no CBOR
// metadata appended to the bytecode (so the installed code depends on the code alone; sourceSha256
// records the exact source text).
import { createHash } from "node:crypto";
import { readFileSync, writeFileSync, mkdirSync, existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import solc from "solc";

const REPO_ROOT = join(dirname(fileURLToPath(import.meta.url)), "..");
const CONTRACT_NAME = "TestUSDC";
const SOURCE_UNIT = `contracts/${CONTRACT_NAME}.sol`;
const ARTIFACT_PATH = join(REPO_ROOT, "src", "imagegate", "contracts", `${CONTRACT_NAME}.json`);

// Cancun: supported by Base and by anvil; pinned so a newer solc default cannot change the bytecode.
const SETTINGS = {
  evmVersion: "cancun",
  optimizer: { enabled: true, runs: 200 },
  metadata: { appendCBOR: false },
  outputSelection: { [SOURCE_UNIT]: { [CONTRACT_NAME]: ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"] } },
};

function build() {
  const source = readFileSync(join(REPO_ROOT, SOURCE_UNIT), "utf8");
  const input = { language: "Solidity", sources: { [SOURCE_UNIT]: { content: source } }, settings: SETTINGS };
  const output = JSON.parse(solc.compile(JSON.stringify(input)));

  const diagnostics = output.errors ?? [];
  for (const diagnostic of diagnostics) {
    process.stderr.write(diagnostic.formattedMessage ?? `${diagnostic.severity}: ${diagnostic.message}\n`);
  }
  if (diagnostics.some((diagnostic) => diagnostic.severity === "error")) {
    throw new Error(`solc reported errors compiling ${SOURCE_UNIT}`);
  }

  const contract = output.contracts[SOURCE_UNIT][CONTRACT_NAME];
  const { outputSelection, ...recordedSettings } = SETTINGS;
  const artifact = {
    contractName: CONTRACT_NAME,
    sourcePath: SOURCE_UNIT,
    compiler: solc.version(),
    settings: recordedSettings,
    sourceSha256: createHash("sha256").update(source, "utf8").digest("hex"),
    abi: contract.abi,
    bytecode: `0x${contract.evm.bytecode.object}`,
    deployedBytecode: `0x${contract.evm.deployedBytecode.object}`,
  };
  return `${JSON.stringify(artifact, null, 2)}\n`;
}

const checkOnly = process.argv.includes("--check");
const fresh = build();

if (checkOnly) {
  const committed = existsSync(ARTIFACT_PATH) ? readFileSync(ARTIFACT_PATH, "utf8") : null;
  if (committed !== fresh) {
    process.stderr.write(
      `${ARTIFACT_PATH} is ${committed === null ? "missing" : "stale"}: run \`node scripts/compile_contracts.mjs\`\n`,
    );
    process.exit(1);
  }
  process.stdout.write(`${ARTIFACT_PATH} is up to date (${solc.version()})\n`);
} else {
  mkdirSync(dirname(ARTIFACT_PATH), { recursive: true });
  writeFileSync(ARTIFACT_PATH, fresh);
  process.stdout.write(`wrote ${ARTIFACT_PATH} (${solc.version()})\n`);
}
