// Every failure in plain words: what happened, whether money moved, and what to do next.

import { ApiError, Unreachable } from "./api";
import { PriceChanged, SignatureRefused, SigningFailed } from "./pay";
import { USER_REJECTED, providerErrorCode } from "./wallet";

export type Action = "switch-network" | "retry" | "check-again" | "connect";

export interface Problem {
  title: string;
  text: string;
  action?: Action;
  // A transaction hash to show (settlement pending).
  transaction?: string;
}

const NOTHING_CHARGED = "Nothing was charged.";

// The x402 failure reasons a 402 carries (ours and the x402 SDK's), for a payment that was refused.
const PAYMENT_REASONS: Record<string, string> = {
  invalid_exact_evm_insufficient_balance: "Insufficient balance: your wallet does not hold enough USDC for this price.",
  invalid_exact_evm_payload_signature: "The wallet's signature did not match the payment.",
  invalid_exact_evm_failed_to_verify_signature: "The wallet's signature could not be verified.",
  invalid_exact_evm_payload_authorization_valid_before: "The signed payment expired before it reached the server.",
  invalid_exact_evm_payload_authorization_valid_after: "The signed payment is not valid yet: check your computer's clock.",
  invalid_exact_evm_payload_authorization_value_mismatch: "The signed amount differs from the price.",
  invalid_exact_evm_nonce_already_used: "This signed payment was already used.",
  invalid_exact_evm_transaction_simulation_failed: "The transfer would fail on chain (is the balance enough?).",
  network_mismatch: "The payment was signed for another network.",
  payment_used_for_another_request: "This payment already paid for another request.",
  transaction_failed: "The transfer failed on chain.",
};

export function explainWalletError(error: unknown, what: string): Problem {
  if (providerErrorCode(error) === USER_REJECTED) {
    return { title: "Declined in your wallet", text: `You declined to ${what}. Nothing changed.` };
  }
  const message = error instanceof Error ? error.message.split("\n")[0] : String(error);
  return { title: "The wallet could not do it", text: `Your wallet could not ${what}: ${message}` };
}

/** A failure of the generate request, in words. */
export function explainFailure(error: unknown): Problem {
  if (error instanceof SignatureRefused) {
    return { title: "Payment declined", text: "You declined the signature in your wallet. Nothing was paid, and your settings are as they were." };
  }
  if (error instanceof PriceChanged) {
    return {
      title: "The price changed",
      text: "The server asked for a different amount than the price shown, so nothing was signed or paid. The price has been refreshed: check it and pay again.",
      action: "retry",
    };
  }
  if (error instanceof SigningFailed) {
    return { title: "The wallet could not sign", text: `Your wallet could not sign the payment (${error.message}). ${NOTHING_CHARGED}` };
  }
  if (error instanceof Unreachable) {
    return { title: "The server cannot be reached", text: `The page could not reach the server; check your connection. ${NOTHING_CHARGED}`, action: "retry" };
  }
  if (!(error instanceof ApiError)) {
    const message = error instanceof Error ? error.message : String(error);
    return { title: "Something went wrong", text: `${message} ${NOTHING_CHARGED}`, action: "retry" };
  }
  const later = error.retryAfterS ? ` Try again in about ${error.retryAfterS} s.` : " Try again shortly.";
  switch (error.code) {
    case "SETTLEMENT_PENDING":
      return {
        title: "Payment sent, waiting for the chain",
        text:
          "Your payment was sent to the network but is not confirmed yet. Do not pay again. " +
          "Once it confirms, “Check again” collects your images with the same payment; " +
          "if it never confirms, the money stays in your wallet.",
        action: "check-again",
        transaction: typeof error.details.transaction === "string" ? error.details.transaction : undefined,
      };
    case "PAYMENT_REQUIRED": {
      const reason = error.reason ?? (typeof error.details.reason === "string" ? error.details.reason : "");
      const words = PAYMENT_REASONS[reason] ?? error.message;
      return { title: "Payment refused", text: `${words} ${NOTHING_CHARGED}` };
    }
    case "SETTLEMENT_FAILED":
      return { title: "The transfer failed", text: `The network refused the transfer, so no money moved and the images were withheld. ${error.message}` };
    case "MODEL_BUSY":
      return { title: "The model is busy", text: `Other people's images are being made right now and the line is full. ${NOTHING_CHARGED}${later}`, action: "retry" };
    case "MODEL_UNAVAILABLE":
      return { title: "This model cannot run now", text: `${error.message} ${NOTHING_CHARGED}` };
    case "PAYMENT_UNAVAILABLE":
      return { title: "Payments are unavailable", text: `The server cannot check payments right now. ${NOTHING_CHARGED}${later}`, action: "retry" };
    case "GENERATION_TIMEOUT":
      return { title: "Generation took too long", text: `The images were not finished in time and the work was stopped. ${NOTHING_CHARGED}${later}`, action: "retry" };
    case "UPSTREAM_UNAVAILABLE":
      return { title: "The image provider is unavailable", text: `${error.message} ${NOTHING_CHARGED}${later}`, action: "retry" };
    case "RATE_LIMITED":
      return { title: "Too many requests", text: `Slow down a little. ${NOTHING_CHARGED}${later}`, action: "retry" };
    case "SERVER_DRAINING":
      return { title: "The server is restarting", text: `${NOTHING_CHARGED}${later}`, action: "retry" };
    default:
      if (error.status >= 400 && error.status < 500) {
        return { title: "These settings were refused", text: `${error.message} ${NOTHING_CHARGED}` };
      }
      return { title: "The server failed", text: `The server ran into an error (${error.code}). ${NOTHING_CHARGED}`, action: "retry" };
  }
}
