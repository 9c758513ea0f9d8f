// Shared by the x402 client harnesses: the request bodies of the API spec's examples, verbatim,
// and the one-line JSON result the Python tests parse.
//
// Environment:
//   BASE_URL     server root, e.g. http://127.0.0.1:8402 (required)
//   PRIVATE_KEY  payer key, 0x-prefixed (required)
//   EXAMPLE      1, 3, 4, 5 or 8: the spec example whose body is sent (default 1)
//   MODEL        replaces the example's model (tests run a tiny model); unset: the spec's "flux-schnell"
//   BODY         raw JSON body sent instead of an example (for tests of other requests)
//   PATHNAME     request path (default /v1/images/generate)
//   MAX_VALUE    payment cap in atomic USDC units; unset: the client library's default

export const SPEC_EXAMPLE_BODIES = {
  1: {
    prompt: "a cute cat sitting on a windowsill, photorealistic",
    model: "flux-schnell",
    width: 512,
    height: 512,
    numberResults: 1,
  },
  3: {
    prompt: "a colorful abstract pattern, geometric shapes",
    model: "flux-schnell",
    width: 512,
    height: 512,
    numberResults: 4,
  },
  4: {
    prompt: "a beautiful portrait of a woman, professional photography",
    negativePrompt: "blurry, distorted, low quality, bad anatomy, ugly",
    model: "flux-schnell",
    width: 768,
    height: 768,
    numberResults: 1,
  },
  5: {
    prompt: "an elegant art deco interior, luxury and sophistication",
    negativePrompt: "modern, minimalist, plain, simple",
    model: "flux-schnell",
    width: 1024,
    height: 1024,
    numberResults: 2,
    steps: 10,
    guidance: 8.0,
    seed: 12345,
  },
  8: {
    prompt: "a steampunk robot, brass and copper, intricate details",
    model: "flux-schnell",
    width: 1024,
    height: 1024,
    numberResults: 1,
    seed: 42,
  },
};

export function requireEnv(name) {
  const value = process.env[name];
  if (!value) {
    fail(new Error(`environment variable ${name} is required`));
  }
  return value;
}

/** The URL and fetch init of the request, written as the spec examples write it. */
export function specRequest() {
  const baseUrl = requireEnv("BASE_URL").replace(/\/+$/, "");
  const url = `${baseUrl}${process.env.PATHNAME ?? "/v1/images/generate"}`;
  let body;
  if (process.env.BODY) {
    body = JSON.parse(process.env.BODY);
  } else {
    const example = process.env.EXAMPLE ?? "1";
    const template = SPEC_EXAMPLE_BODIES[example];
    if (!template) {
      fail(new Error(`EXAMPLE must be one of ${Object.keys(SPEC_EXAMPLE_BODIES).join(", ")}, not ${example}`));
    }
    body = { ...template };
    if (process.env.MODEL) {
      body.model = process.env.MODEL;
    }
  }
  const init = {
    method: "POST",
    headers: {
      "Content-Type": "application/json",
    },
    body: JSON.stringify(body),
  };
  return { url, init };
}

/** Prints {status, body, paymentResponse, headers}; exit 0: an HTTP response was received. */
export async function report(response, decodePaymentResponse) {
  const text = await response.text();
  let body;
  try {
    body = JSON.parse(text);
  } catch {
    body = text;
  }
  const headers = Object.fromEntries(response.headers.entries());
  console.log(JSON.stringify({ status: response.status, body, paymentResponse: decodePaymentResponse(), headers }));
}

/** Prints {error, name}; exit 2: the client library failed before or instead of an HTTP response. */
export function fail(error) {
  console.log(JSON.stringify({ error: String(error?.message ?? error), name: error?.name ?? "Error" }));
  process.exit(2);
}
