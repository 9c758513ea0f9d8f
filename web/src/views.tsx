// The wallet panel, the problem box and the gallery.

import { useState } from "preact/hooks";
import { formatUnits } from "viem";
import type { PaymentsConfig } from "./api";
import { type GalleryEntry, explorerLink } from "./gallery";
import type { Problem } from "./messages";
import type { DiscoveredWallet, Wallet } from "./wallet";

export function formatUsdc(amount: bigint, decimals: number): string {
  return `${formatUnits(amount, decimals)} USDC`;
}

export function shortAddress(address: string): string {
  return `${address.slice(0, 6)}…${address.slice(-4)}`;
}

interface WalletPanelProps {
  payments: PaymentsConfig;
  wallets: DiscoveredWallet[];
  wallet: Wallet | null;
  chainId: number | null;
  balance: bigint | null;
  priceAmount: bigint | null;
  offerTestWallet: boolean;
  busy: boolean;
  onConnect: (wallet: DiscoveredWallet) => void;
  onUseTestWallet: () => void;
  onSwitch: () => void;
  onDisconnect: () => void;
}

export function WalletPanel(props: WalletPanelProps) {
  const { payments, wallets, wallet, chainId, balance, priceAmount, busy } = props;
  const chain = payments.chain;
  if (!chain) return null;
  if (!wallet) {
    return (
      <section class="panel wallet" aria-labelledby="wallet-heading">
        <h2 id="wallet-heading" tabIndex={-1}>
          Wallet
        </h2>
        <p>
          Pay with USDC on {chain.name}: one signature in your wallet, no gas, and you are charged only once your images are
          stored.
        </p>
        {wallets.length > 0 ? (
          <ul class="wallet-list">
            {wallets.map((found) => (
              <li key={found.info.uuid}>
                <button type="button" onClick={() => props.onConnect(found)} disabled={busy}>
                  {found.info.icon && <img src={found.info.icon} alt="" width={20} height={20} />}
                  Connect {found.info.name}
                </button>
              </li>
            ))}
          </ul>
        ) : (
          <p class="hint">No browser wallet was found on this page. A wallet extension that supports {chain.name} can pay here.</p>
        )}
        {props.offerTestWallet && (
          <div class="test-wallet">
            <button type="button" class="secondary" onClick={props.onUseTestWallet} disabled={busy}>
              Pay with the dev-chain test wallet
            </button>
            <p class="hint">A funded account of the local test chain, for trying the playground without a wallet. Its coins are not real.</p>
          </div>
        )}
      </section>
    );
  }
  const wrongChain = chainId !== null && chainId !== chain.chainId;
  const short = balance !== null && priceAmount !== null && balance < priceAmount;
  return (
    <section class="panel wallet" aria-labelledby="wallet-heading">
      <h2 id="wallet-heading" tabIndex={-1}>
          Wallet
        </h2>
      <dl class="facts">
        <dt>Wallet</dt>
        <dd>{wallet.name}</dd>
        <dt>Account</dt>
        <dd>
          <code title={wallet.address}>{shortAddress(wallet.address)}</code>
        </dd>
        <dt>Network</dt>
        <dd>{wrongChain ? `chain ${chainId} (not ${chain.name})` : chain.name}</dd>
        <dt>Balance</dt>
        <dd data-testid="balance">{balance === null ? (wrongChain ? "shown once on " + chain.name : "…") : formatUsdc(balance, payments.decimals)}</dd>
      </dl>
      {wrongChain && (
        <div class="notice warn" role="status">
          <p>
            Your wallet is on chain {chainId}; payments here are on {chain.name} (chain {chain.chainId}).
          </p>
          <button type="button" onClick={props.onSwitch} disabled={busy}>
            Switch to {chain.name}
          </button>
        </div>
      )}
      {!wrongChain && short && (
        <p class="notice warn" role="status">
          Insufficient balance: this account holds {formatUsdc(balance as bigint, payments.decimals)}, and these images cost{" "}
          {formatUsdc(priceAmount as bigint, payments.decimals)}.
        </p>
      )}
      <button type="button" class="link-button" onClick={props.onDisconnect} disabled={busy}>
        Disconnect
      </button>
    </section>
  );
}

interface ProblemProps {
  problem: Problem;
  explorerUrl: string | null;
  onAction: () => void;
  busy: boolean;
}

export function ProblemBox({ problem, explorerUrl, onAction, busy }: ProblemProps) {
  const transactionUrl = explorerLink(explorerUrl, problem.transaction ?? null);
  const label: Record<string, string> = {
    "switch-network": "Switch network",
    retry: "Try again",
    "check-again": "Check again",
    connect: "Connect a wallet",
  };
  return (
    <div class="notice error" role="alert">
      <p>
        <strong>{problem.title}.</strong> {problem.text}
      </p>
      {problem.transaction && (
        <p>
          Transaction: <code class="hash">{problem.transaction}</code>
          {transactionUrl && (
            <>
              {" "}
              (
              <a href={transactionUrl} target="_blank" rel="noopener noreferrer">
                follow it on the block explorer
              </a>
              )
            </>
          )}
        </p>
      )}
      {problem.action && (
        <button type="button" onClick={onAction} disabled={busy}>
          {label[problem.action]}
        </button>
      )}
    </div>
  );
}

interface GalleryProps {
  entries: GalleryEntry[];
  testChain: boolean;
  onReuse: (entry: GalleryEntry, seed: number) => void;
}

export function Gallery({ entries, testChain, onReuse }: GalleryProps) {
  const [copied, setCopied] = useState<string | null>(null);
  const [manualCopy, setManualCopy] = useState<string | null>(null);
  const copy = async (url: string) => {
    try {
      await navigator.clipboard.writeText(url);
      setCopied(url);
      setManualCopy(null);
    } catch {
      // No clipboard (a page not served over https or localhost): show the URL selected instead.
      setManualCopy(url);
    }
  };
  if (entries.length === 0) {
    return <p class="hint">Your images will appear here. They stay listed in this browser, and their links are permanent.</p>;
  }
  return (
    <ol class="gallery">
      {entries.map((entry) => (
        <li key={entry.id} class="entry">
          <h3 id={`entry-${entry.id}`} tabIndex={-1}>
            {entry.prompt}
          </h3>
          <p class="meta">
            {entry.modelName} · {entry.images.length} image{entry.images.length === 1 ? "" : "s"}
            {entry.priceUsd !== null ? ` · paid $${entry.priceUsd}` : " · free"}
            {entry.transaction && (
              <>
                {" · "}
                {entry.transactionUrl ? (
                  <a href={entry.transactionUrl} target="_blank" rel="noopener noreferrer">
                    transaction on the block explorer
                  </a>
                ) : (
                  <span>
                    transaction <code class="hash">{entry.transaction}</code>
                    {testChain ? " (local test chain: no explorer)" : ""}
                  </span>
                )}
              </>
            )}
          </p>
          <ul class="images">
            {entry.images.map((image, index) => (
              <li key={image.uuid} class="image-card">
                <a href={image.url} target="_blank" rel="noopener">
                  <img
                    src={image.url}
                    alt={`Image ${index + 1} of ${entry.images.length}: ${entry.prompt}`}
                    width={image.width}
                    height={image.height}
                    loading="lazy"
                  />
                </a>
                <p class="meta">
                  Seed <code>{image.seed}</code> · {image.width} × {image.height}
                </p>
                <div class="actions">
                  <a class="button secondary" href={image.url} download={`imagegate-${image.url.split("/").pop() ?? image.uuid}`}>
                    Download<span class="visually-hidden"> image {index + 1}</span>
                  </a>
                  <button type="button" class="secondary" onClick={() => copy(image.url)}>
                    {copied === image.url ? "Copied" : "Copy URL"}
                    <span class="visually-hidden"> of image {index + 1}</span>
                  </button>
                  <button type="button" class="secondary" onClick={() => onReuse(entry, image.seed)}>
                    Use these settings again<span class="visually-hidden"> (seed {image.seed})</span>
                  </button>
                </div>
                {manualCopy === image.url && (
                  <label class="manual-copy">
                    Copy this link:
                    <input type="text" readOnly value={image.url} ref={(input) => input?.select()} />
                  </label>
                )}
              </li>
            ))}
          </ul>
        </li>
      ))}
    </ol>
  );
}
