#!/usr/bin/env node
// Pays with @x402/fetch@2.27.0 + @x402/evm (protocol v2: PAYMENT-REQUIRED header, PAYMENT-SIGNATURE /
// PAYMENT-RESPONSE headers). Only the v2 scheme for eip155:84532 is registered, so a server whose v2
// challenge is missing or wrong fails here instead of being paid through its v1 body.
// Spend controls stay on (the canonical Base Sepolia USDC is a default asset); MAX_VALUE (atomic
// units) replaces their $1 per-payment cap. See spec_examples.mjs for the environment.
import { decodePaymentResponseHeader, wrapFetchWithPayment, x402Client } from "@x402/fetch";
import { ExactEvmScheme } from "@x402/evm/exact/client";
import { privateKeyToAccount } from "viem/accounts";

import { fail, report, requireEnv, specRequest } from "./spec_examples.mjs";

const NETWORK = "eip155:84532";
const USDC_DECIMALS = 6n;

/** Atomic USDC units as an exact dollar string, e.g. 1500000n -> "$1.500000". */
function atomicToDollars(atomic) {
  const scale = 10n ** USDC_DECIMALS;
  return `$${atomic / scale}.${(atomic % scale).toString().padStart(Number(USDC_DECIMALS), "0")}`;
}

try {
  const account = privateKeyToAccount(requireEnv("PRIVATE_KEY"));
  const spendControls = process.env.MAX_VALUE
    ? { maxAmountPerPayment: atomicToDollars(BigInt(process.env.MAX_VALUE)) }
    : undefined;
  const client = x402Client.fromConfig({
    schemes: [{ network: NETWORK, client: new ExactEvmScheme(account) }],
    ...(spendControls ? { spendControls } : {}),
  });
  const fetchWithPayment = wrapFetchWithPayment(fetch, client);
  const { url, init } = specRequest();
  const response = await fetchWithPayment(url, init);
  await report(response, () => {
    const header = response.headers.get("PAYMENT-RESPONSE");
    return header ? decodePaymentResponseHeader(header) : null;
  });
} catch (error) {
  fail(error);
}
