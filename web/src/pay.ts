// Paying for a generation with the x402 v2 browser client: @x402/fetch sends the request, reads the
// 402 challenge, has the wallet sign one EIP-3009 authorization (typed data, no gas) through
// @x402/evm, and sends the request again with it.

import { registerExactEvmScheme } from "@x402/evm/exact/client";
import { type PaymentRequirements, wrapFetchWithPayment, x402Client } from "@x402/fetch";
import { Unreachable, send } from "./api";
import { USER_REJECTED, type Wallet, providerErrorCode } from "./wallet";

const GENERATE_PATH = "v1/images/generate";
const PAYMENT_HEADERS = ["PAYMENT-SIGNATURE", "X-PAYMENT"];

/** The wallet declined to sign: nothing was paid. */
export class SignatureRefused extends Error {}

/** The 402 asked for another amount than the price the visitor saw: nothing was signed. */
export class PriceChanged extends Error {
  constructor(readonly asked: string[]) {
    super(`The server asked for ${asked.join(" or ")} atomic units instead of the price shown.`);
  }
}

/** The wallet failed to sign for another reason (locked, wrong account, a bug in the wallet). */
export class SigningFailed extends Error {}

export interface Sent {
  response: Response;
  // Sends the same request with the same signed payment again: how a settlement that was pending is
  // collected (the server answers with the images once the transfer is confirmed). Never re-signs.
  resend: (() => Promise<Response>) | null;
}

export interface PayOptions {
  wallet: Wallet;
  network: string;
  // The exact amount shown to the visitor, in atomic units: any other demand is refused unsigned.
  expectedAmount: string;
  requestId: string;
  onSigning: () => void;
  onSigned: () => void;
}

function headersFor(requestId: string): Record<string, string> {
  return { "Content-Type": "application/json", Accept: "application/json", "X-Request-ID": requestId };
}

export async function generateFree(body: Record<string, unknown>, requestId: string): Promise<Sent> {
  const response = await send(GENERATE_PATH, { method: "POST", headers: headersFor(requestId), body: JSON.stringify(body) });
  return { response, resend: null };
}

export async function generatePaid(body: Record<string, unknown>, options: PayOptions): Promise<Sent> {
  let paymentHeader: [string, string] | null = null;
  let creationError: unknown = null;
  let refusedAmounts: string[] | null = null;

  // Remembers the signed payment header so that a pending settlement can be collected later.
  const recordingFetch = async (input: RequestInfo | URL, init?: RequestInit): Promise<Response> => {
    const request = new Request(input, init);
    for (const name of PAYMENT_HEADERS) {
      const value = request.headers.get(name);
      if (value) paymentHeader = [name, value];
    }
    try {
      return await fetch(request);
    } catch (error) {
      throw new Unreachable(String(error));
    }
  };

  const client = new x402Client();
  registerExactEvmScheme(client, {
    signer: options.wallet.signer,
    networks: [options.network as `${string}:${string}`],
    policies: [
      (version: number, requirements: PaymentRequirements[]) => {
        const amountOf = (r: PaymentRequirements) =>
          version === 1 ? String((r as unknown as { maxAmountRequired: string }).maxAmountRequired) : r.amount;
        const matching = requirements.filter((r) => amountOf(r) === options.expectedAmount);
        if (matching.length === 0) refusedAmounts = requirements.map(amountOf);
        return matching;
      },
    ],
  });
  // The exact-amount policy above is the cap: the visitor approved this price and no other.
  client.setSpendControls({ maxAmountPerPayment: false });
  client.onBeforePaymentCreation(async () => options.onSigning());
  client.onAfterPaymentCreation(async () => options.onSigned());
  client.onPaymentCreationFailure(async ({ error }) => {
    creationError = error;
  });

  const paidFetch = wrapFetchWithPayment(recordingFetch, client);
  const text = JSON.stringify(body);
  let response: Response;
  try {
    response = await paidFetch(GENERATE_PATH, { method: "POST", headers: headersFor(options.requestId), body: text });
  } catch (error) {
    if (error instanceof Unreachable) throw error;
    if (refusedAmounts) throw new PriceChanged(refusedAmounts);
    // @x402/fetch rethrows the wallet's error as a plain message: its code is read from the hook's copy.
    if (providerErrorCode(creationError) === USER_REJECTED || providerErrorCode(error) === USER_REJECTED) {
      throw new SignatureRefused("You declined the signature in your wallet.");
    }
    if (creationError) throw new SigningFailed(String((creationError as Error).message ?? creationError));
    throw error;
  }
  const signed = paymentHeader as [string, string] | null;
  const resend = signed
    ? () =>
        send(GENERATE_PATH, {
          method: "POST",
          headers: { ...headersFor(options.requestId), [signed[0]]: signed[1] },
          body: text,
        })
    : null;
  return { response, resend };
}
