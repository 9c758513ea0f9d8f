// The server's free routes, typed as the page uses them. Every URL is relative to the page, so the
// playground works wherever imagegate is mounted.

export interface ModelInfo {
  id: string;
  name: string;
  description: string;
  default: boolean;
  supportsSteps: boolean;
  defaultSteps: number;
  minSteps: number;
  maxSteps: number;
  supportsGuidance: boolean;
  defaultGuidance: number | null;
  supportsNegativePrompt: boolean;
  parameterNotes: string;
  defaultWidth: number;
  defaultHeight: number;
  available: boolean;
  unavailableReason: string | null;
}

export interface ModelsResponse {
  defaultModel: string;
  models: ModelInfo[];
}

export interface ChainInfo {
  chainId: number;
  name: string;
  rpcUrls: string[];
  // None on the dev chain: nothing on a local chain can be looked up in a public explorer.
  explorerUrl: string | null;
  nativeCurrency: { name: string; symbol: string; decimals: number };
}

export interface PaymentsConfig {
  enabled: boolean;
  testChain: boolean;
  notice: string | null;
  network: string | null;
  networkName: string | null;
  asset: string | null;
  decimals: number;
  payTo: string | null;
  chain: ChainInfo | null;
  // Balances on the dev chain are read through the server (a wallet's own RPC for chain 84532 is
  // the public Base Sepolia, not this machine's anvil).
  balanceUrl: string | null;
}

export interface Limits {
  minSide: number;
  maxSide: number;
  sideMultiple: number;
  minPrompt: number;
  maxPrompt: number;
  maxNegativePrompt: number;
  minResults: number;
  maxResults: number;
  minGuidance: number;
  maxGuidance: number;
  maxSeed: number;
  outputFormats: string[];
  defaultOutputFormat: string;
}

export interface PlaygroundConfig {
  payments: PaymentsConfig;
  testWallet: { address: `0x${string}`; privateKey: `0x${string}` } | null;
  limits: Limits;
  // Recent render time per model on this server (seconds), when it has rendered that model.
  typicalSeconds: Record<string, number>;
}

export interface Estimate {
  model: string;
  dimensions: string;
  number_of_images: number;
  steps: number;
  estimatedCost: { usd: string; amount: string; asset: string | null; network: string | null; decimals: number };
}

export interface GeneratedImage {
  url: string;
  uuid: string;
  seed: number;
  width: number;
  height: number;
}

export interface GenerateResponse {
  id: string;
  images: GeneratedImage[];
  model: string;
  steps: number;
  cost?: { usd: string; amount: string; transaction?: string; payer?: string; network?: string };
}

/** An error answer of the API: `{"error": CODE, "message": ..., "details": {...}}` and its status. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly details: Record<string, unknown> = {},
    readonly retryAfterS: number | null = null,
    readonly reason: string | null = null,
  ) {
    super(message);
  }

  get field(): string | null {
    return typeof this.details.field === "string" ? this.details.field : null;
  }
}

/** The server could not be reached at all (offline, stopped, a proxy in between failed). */
export class Unreachable extends Error {}

export async function apiErrorOf(response: Response): Promise<ApiError> {
  let body: Record<string, unknown> = {};
  try {
    body = (await response.json()) as Record<string, unknown>;
  } catch {
    // Not JSON (a proxy's error page): the status alone must do.
  }
  const retryAfter = Number(response.headers.get("Retry-After"));
  return new ApiError(
    response.status,
    typeof body.error === "string" ? body.error : `HTTP_${response.status}`,
    typeof body.message === "string" ? body.message : response.statusText || `HTTP ${response.status}`,
    (body.details as Record<string, unknown> | undefined) ?? {},
    Number.isFinite(retryAfter) && retryAfter > 0 ? retryAfter : null,
    typeof body.reason === "string" ? body.reason : null,
  );
}

export async function send(input: string, init?: RequestInit): Promise<Response> {
  try {
    return await fetch(input, init);
  } catch (error) {
    if (error instanceof DOMException && error.name === "AbortError") throw error;
    throw new Unreachable(String(error));
  }
}

async function getJson<T>(path: string): Promise<T> {
  const response = await send(path, { headers: { Accept: "application/json" } });
  if (!response.ok) throw await apiErrorOf(response);
  return (await response.json()) as T;
}

export const loadModels = (): Promise<ModelsResponse> => getJson<ModelsResponse>("v1/images/models");
export const loadConfig = (): Promise<PlaygroundConfig> => getJson<PlaygroundConfig>("playground/config");

export async function estimate(body: Record<string, unknown>, signal: AbortSignal): Promise<Estimate> {
  const response = await send("v1/images/estimate", {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "application/json" },
    body: JSON.stringify(body),
    signal,
  });
  if (!response.ok) throw await apiErrorOf(response);
  return (await response.json()) as Estimate;
}

export async function devChainBalance(url: string, address: string): Promise<bigint> {
  const response = await send(`${url}/${address}`, { headers: { Accept: "application/json" } });
  if (!response.ok) throw await apiErrorOf(response);
  const body = (await response.json()) as { amount: string };
  return BigInt(body.amount);
}
