#!/usr/bin/env node
// Pays with x402-fetch@1.2.0 (protocol v1: JSON 402 body, X-PAYMENT / X-PAYMENT-RESPONSE headers),
// called exactly as the API spec's examples call it. See spec_examples.mjs for the environment.
import { decodeXPaymentResponse, wrapFetchWithPayment } from "x402-fetch";
import { privateKeyToAccount } from "viem/accounts";

import { fail, report, requireEnv, specRequest } from "./spec_examples.mjs";

try {
  const account = privateKeyToAccount(requireEnv("PRIVATE_KEY"));
  const fetchWithPayment = process.env.MAX_VALUE
    ? wrapFetchWithPayment(fetch, account, BigInt(process.env.MAX_VALUE))
    : wrapFetchWithPayment(fetch, account);
  const { url, init } = specRequest();
  const response = await fetchWithPayment(url, init);
  await report(response, () => {
    const header = response.headers.get("X-PAYMENT-RESPONSE");
    return header ? decodeXPaymentResponse(header) : null;
  });
} catch (error) {
  fail(error);
}
