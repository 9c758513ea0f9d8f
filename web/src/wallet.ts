// Wallets: browser wallets found through EIP-6963 (EIP-1193 providers, driven through viem), and on
// the embedded dev chain only, the dev chain's funded test account held by the page itself.

import type { ClientEvmSigner } from "@x402/evm";
import {
  type Address,
  type EIP1193Provider,
  createPublicClient,
  createWalletClient,
  custom,
  defineChain,
  erc20Abi,
  getAddress,
} from "viem";
import { privateKeyToAccount } from "viem/accounts";
import { type ChainInfo, type PaymentsConfig, devChainBalance } from "./api";

export interface WalletInfo {
  uuid: string;
  name: string;
  icon: string;
  rdns: string;
}

export interface DiscoveredWallet {
  info: WalletInfo;
  provider: EIP1193Provider;
}

interface AnnounceEvent extends Event {
  detail: DiscoveredWallet;
}

/**
 * EIP-6963 discovery: wallets announce themselves in answer to a request event, and again whenever
 * they load later. The handshake is two events, so it is written here rather than pulled in as a
 * library. A lone legacy `window.ethereum` (a wallet that predates EIP-6963) is offered too.
 */
export function discoverWallets(onChange: (wallets: DiscoveredWallet[]) => void): () => void {
  const found = new Map<string, DiscoveredWallet>();
  const announce = (event: Event) => {
    const { detail } = event as AnnounceEvent;
    if (!detail?.info?.uuid || typeof detail.provider?.request !== "function") return;
    found.set(detail.info.uuid, detail);
    onChange([...found.values()]);
  };
  window.addEventListener("eip6963:announceProvider", announce);
  window.dispatchEvent(new Event("eip6963:requestProvider"));
  const legacy = (window as { ethereum?: EIP1193Provider }).ethereum;
  const fallback = window.setTimeout(() => {
    if (found.size === 0 && legacy && typeof legacy.request === "function") {
      onChange([{ info: { uuid: "legacy", name: "Browser wallet", icon: "", rdns: "" }, provider: legacy }]);
    }
  }, 400);
  return () => {
    window.removeEventListener("eip6963:announceProvider", announce);
    window.clearTimeout(fallback);
  };
}

export interface Wallet {
  kind: "browser" | "test";
  name: string;
  address: Address;
  signer: ClientEvmSigner;
  chainId(): Promise<number>;
  /** Ask the wallet to move to the payment chain, adding it when the wallet does not know it. */
  switchTo(chain: ChainInfo): Promise<void>;
  balance(payments: PaymentsConfig): Promise<bigint>;
  /** Follow the wallet's account and network changes; returns the unsubscribe function. */
  watch(onChange: () => void): () => void;
  disconnect(): void;
}

/** The numeric EIP-1193 error code anywhere in an error's cause chain (viem wraps provider errors). */
export function providerErrorCode(error: unknown): number | null {
  let current: unknown = error;
  for (let depth = 0; current && depth < 8; depth += 1) {
    const code = (current as { code?: unknown }).code;
    if (typeof code === "number") return code;
    current = (current as { cause?: unknown }).cause;
  }
  return null;
}

export const USER_REJECTED = 4001;
const UNRECOGNIZED_CHAIN = 4902;

function viemChain(chain: ChainInfo) {
  return defineChain({
    id: chain.chainId,
    name: chain.name,
    nativeCurrency: chain.nativeCurrency,
    rpcUrls: { default: { http: chain.rpcUrls } },
    ...(chain.explorerUrl ? { blockExplorers: { default: { name: "Explorer", url: chain.explorerUrl } } } : {}),
  });
}

async function balanceThroughServer(payments: PaymentsConfig, address: Address): Promise<bigint | null> {
  return payments.balanceUrl ? devChainBalance(payments.balanceUrl, address) : null;
}

export async function connectBrowserWallet(discovered: DiscoveredWallet): Promise<Wallet> {
  const { provider, info } = discovered;
  const accounts = (await provider.request({ method: "eth_requestAccounts" })) as string[];
  if (!accounts?.length) throw new Error("The wallet shared no account.");
  const address = getAddress(accounts[0]);
  const walletClient = createWalletClient({ account: address, transport: custom(provider) });
  const publicClient = createPublicClient({ transport: custom(provider) });
  const listeners: Array<[string, (...args: unknown[]) => void]> = [];
  const disconnect = () => {
    for (const [event, listener] of listeners.splice(0)) {
      provider.removeListener(event as "chainChanged", listener);
    }
  };
  return {
    kind: "browser",
    name: info.name,
    address,
    // One eth_signTypedData_v4 request per payment (the EIP-3009 authorization); no gas, no transaction.
    signer: {
      address,
      signTypedData: (message) =>
        walletClient.signTypedData({
          account: address,
          domain: message.domain,
          types: message.types,
          primaryType: message.primaryType,
          message: message.message,
        } as Parameters<typeof walletClient.signTypedData>[0]),
    },
    chainId: () => walletClient.getChainId(),
    async switchTo(chain) {
      try {
        await walletClient.switchChain({ id: chain.chainId });
      } catch (error) {
        if (providerErrorCode(error) !== UNRECOGNIZED_CHAIN) throw error;
        await walletClient.addChain({ chain: viemChain(chain) });
        await walletClient.switchChain({ id: chain.chainId });
      }
    },
    async balance(payments) {
      const viaServer = await balanceThroughServer(payments, address);
      if (viaServer !== null) return viaServer;
      return publicClient.readContract({
        address: getAddress(payments.asset as string),
        abi: erc20Abi,
        functionName: "balanceOf",
        args: [address],
      });
    },
    watch(onChange) {
      for (const event of ["accountsChanged", "chainChanged"] as const) {
        const listener = () => onChange();
        provider.on(event, listener);
        listeners.push([event, listener]);
      }
      return disconnect;
    },
    disconnect,
  };
}

/** The dev chain's funded test account, offered by the server only on its embedded dev chain. */
export function devChainTestWallet(privateKey: `0x${string}`, chain: ChainInfo): Wallet {
  const account = privateKeyToAccount(privateKey);
  return {
    kind: "test",
    name: "Dev-chain test wallet",
    address: account.address,
    signer: { address: account.address, signTypedData: (message) => account.signTypedData(message as Parameters<typeof account.signTypedData>[0]) },
    chainId: async () => chain.chainId,
    switchTo: async () => undefined,
    async balance(payments) {
      const viaServer = await balanceThroughServer(payments, account.address);
      if (viaServer === null) throw new Error("The dev chain's balance route is missing.");
      return viaServer;
    },
    watch: () => () => undefined,
    disconnect: () => undefined,
  };
}
