// The playground: settings → live price → wallet → pay → images.

import { useCallback, useEffect, useMemo, useRef, useState } from "preact/hooks";
import {
  ApiError,
  type Estimate,
  type GenerateResponse,
  type ModelInfo,
  type PlaygroundConfig,
  apiErrorOf,
  estimate as fetchEstimate,
  loadConfig,
  loadModels,
} from "./api";
import { SettingsForm } from "./form";
import { type GalleryEntry, explorerLink, loadGallery, saveGallery } from "./gallery";
import { type Problem, explainFailure, explainWalletError } from "./messages";
import { PriceChanged, type Sent, generateFree, generatePaid } from "./pay";
import { type JobEvents, type Progress, describeProgress, fractionDone, watchProgress } from "./progress";
import { type FieldErrors, type Settings, initialSettings, requestBody, settingsFromRequest, validate } from "./settings";
import { Gallery, ProblemBox, WalletPanel, formatUsdc } from "./views";
import { type DiscoveredWallet, type Wallet, connectBrowserWallet, devChainTestWallet, discoverWallets } from "./wallet";

type Phase = "idle" | "preparing" | "signing" | "generating" | "checking";

interface PriceState {
  // The estimate body the answer is for: a price is shown only for the settings on screen.
  key: string | null;
  estimate: Estimate | null;
  loading: boolean;
  error: ApiError | null;
}

const ESTIMATE_DEBOUNCE_MS = 200;
// The server's job events for a request (queue position, steps), once it streams them: a
// subscription by request id set here turns the elapsed-time progress into a step-by-step one.
const JOB_EVENTS: JobEvents | undefined = undefined;

function newRequestId(): string {
  if (typeof crypto.randomUUID === "function") return crypto.randomUUID();
  // randomUUID needs a secure context; a page on plain http (a LAN address) still gets a random id.
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

export function App() {
  const [config, setConfig] = useState<PlaygroundConfig | null>(null);
  const [models, setModels] = useState<ModelInfo[]>([]);
  const [bootError, setBootError] = useState<string | null>(null);
  const [settings, setSettings] = useState<Settings | null>(null);
  const [attempted, setAttempted] = useState(false);
  const [price, setPrice] = useState<PriceState>({ key: null, estimate: null, loading: false, error: null });
  const [wallets, setWallets] = useState<DiscoveredWallet[]>([]);
  const [wallet, setWallet] = useState<Wallet | null>(null);
  const [chainId, setChainId] = useState<number | null>(null);
  const [balance, setBalance] = useState<bigint | null>(null);
  const [phase, setPhase] = useState<Phase>("idle");
  const [status, setStatus] = useState("");
  const [progress, setProgress] = useState<Progress | null>(null);
  const [problem, setProblem] = useState<Problem | null>(null);
  const [gallery, setGallery] = useState<GalleryEntry[]>(loadGallery);
  const pending = useRef<{ sent: Sent; body: Record<string, unknown>; model: ModelInfo } | null>(null);
  const busy = phase !== "idle";

  useEffect(() => {
    Promise.all([loadConfig(), loadModels()])
      .then(([loadedConfig, loadedModels]) => {
        const first = loadedModels.models.find((m) => m.id === loadedModels.defaultModel) ?? loadedModels.models[0];
        setConfig(loadedConfig);
        setModels(loadedModels.models);
        setSettings(initialSettings(first, loadedConfig.limits));
      })
      .catch((error: unknown) => setBootError(error instanceof Error ? error.message : String(error)));
    return discoverWallets(setWallets);
  }, []);

  const model = useMemo(() => models.find((m) => m.id === settings?.model) ?? null, [models, settings?.model]);
  const errors: FieldErrors = useMemo(
    () => (settings && model && config ? validate(settings, model, config.limits, { needPrompt: attempted }) : {}),
    [settings, model, config, attempted],
  );
  const priceKey = useMemo(
    () => (settings && model ? JSON.stringify(requestBody(settings, model, { withPrompt: false })) : null),
    [settings, model],
  );
  // The server's word on these very settings (an answer for earlier settings says nothing about them).
  const priceError = price.key === priceKey ? price.error : null;
  const shownErrors: FieldErrors = useMemo(() => {
    if (!priceError || priceError.status !== 400) return errors;
    const field = (priceError.field ?? "model") as keyof Settings;
    return { [field]: priceError.message, ...errors };
  }, [errors, priceError]);

  // The live price: every change of the settings asks the server's estimate (debounced, stale answers dropped).
  useEffect(() => {
    if (!settings || !model || !config) return;
    if (Object.keys(validate(settings, model, config.limits, { needPrompt: false })).length > 0) {
      setPrice({ key: null, estimate: null, loading: false, error: null });
      return;
    }
    const body = requestBody(settings, model, { withPrompt: false });
    const key = JSON.stringify(body);
    const controller = new AbortController();
    setPrice((previous) => ({ ...previous, loading: true }));
    const timer = window.setTimeout(() => {
      fetchEstimate(body, controller.signal)
        .then((value) => {
          if (!controller.signal.aborted) setPrice({ key, estimate: value, loading: false, error: null });
        })
        .catch((error: unknown) => {
          if (controller.signal.aborted) return;
          const apiError = error instanceof ApiError ? error : new ApiError(0, "UNREACHABLE", "The price could not be fetched: the server cannot be reached.");
          setPrice({ key, estimate: null, loading: false, error: apiError });
        });
    }, ESTIMATE_DEBOUNCE_MS);
    return () => {
      window.clearTimeout(timer);
      controller.abort();
    };
  }, [settings, model, config]);

  const refreshWallet = useCallback(
    async (current: Wallet | null) => {
      if (!current || !config) return;
      try {
        const currentChain = await current.chainId();
        setChainId(currentChain);
        // Off the payment network, a wallet's own node would answer for another chain's token.
        const readable = config.payments.balanceUrl !== null || currentChain === config.payments.chain?.chainId;
        setBalance(readable ? await current.balance(config.payments) : null);
      } catch (error) {
        setBalance(null);
        setProblem({ title: "Balance unknown", text: `The USDC balance could not be read (${error instanceof Error ? error.message.split("\n")[0] : error}).` });
      }
    },
    [config],
  );

  useEffect(() => {
    if (!wallet) return;
    void refreshWallet(wallet);
    return wallet.watch(() => void refreshWallet(wallet));
  }, [wallet, refreshWallet]);

  if (bootError) {
    return (
      <main id="main" class="boot-error">
        <h1>imagegate playground</h1>
        <p role="alert">The page could not load the server's models and settings: {bootError}. Reload to try again.</p>
      </main>
    );
  }
  if (!config || !settings || !model) {
    return (
      <main id="main">
        <h1>imagegate playground</h1>
        <p role="status">Loading models and prices…</p>
      </main>
    );
  }

  const payments = config.payments;
  const currentEstimate = price.key === priceKey ? price.estimate : null;
  const priceAmount = currentEstimate ? BigInt(currentEstimate.estimatedCost.amount) : null;
  const typicalS = config.typicalSeconds[model.id] ?? null;

  const update = (patch: Partial<Settings>) => {
    setSettings({ ...settings, ...patch });
    if (problem && !problem.action) setProblem(null);
  };

  // The button that was pressed is gone once connected: keep keyboard focus in the wallet panel.
  const focusWalletPanel = () => window.setTimeout(() => document.getElementById("wallet-heading")?.focus(), 0);

  const connect = async (found: DiscoveredWallet) => {
    setProblem(null);
    setPhase("preparing");
    setStatus(`Asking ${found.info.name} to connect…`);
    try {
      const connected = await connectBrowserWallet(found);
      wallet?.disconnect();
      setWallet(connected);
      setStatus(`Connected to ${found.info.name}.`);
      focusWalletPanel();
    } catch (error) {
      setProblem(explainWalletError(error, "connect"));
      setStatus("");
    } finally {
      setPhase("idle");
    }
  };

  const useTestWallet = () => {
    if (!config.testWallet || !payments.chain) return;
    wallet?.disconnect();
    setProblem(null);
    setWallet(devChainTestWallet(config.testWallet.privateKey, payments.chain));
    setStatus("Using the dev-chain test wallet.");
    focusWalletPanel();
  };

  const switchNetwork = async () => {
    if (!wallet || !payments.chain) return;
    setProblem(null);
    setPhase("preparing");
    setStatus(`Asking your wallet to switch to ${payments.chain.name}…`);
    try {
      await wallet.switchTo(payments.chain);
      await refreshWallet(wallet);
      setStatus(`Your wallet is on ${payments.chain.name}.`);
    } catch (error) {
      setProblem({ ...explainWalletError(error, `switch to ${payments.chain.name}`), action: "switch-network" });
      setStatus("");
    } finally {
      setPhase("idle");
    }
  };

  const disconnect = () => {
    wallet?.disconnect();
    setWallet(null);
    setBalance(null);
    setChainId(null);
    setStatus("Wallet disconnected.");
  };

  const focusFirstInvalid = (fieldErrors: FieldErrors) => {
    const first = Object.keys(fieldErrors)[0];
    if (!first) return;
    const element = document.getElementById(first) as HTMLElement | null;
    if (element?.closest("details")) (element.closest("details") as HTMLDetailsElement).open = true;
    element?.focus();
  };

  const finish = async (response: Response, body: Record<string, unknown>, usedModel: ModelInfo, sent: Sent) => {
    if (response.status === 200) {
      const result = (await response.json()) as GenerateResponse;
      const transaction = result.cost?.transaction || null;
      const entry: GalleryEntry = {
        id: result.id,
        createdAt: new Date().toISOString(),
        modelName: usedModel.name,
        prompt: String(body.prompt),
        request: body,
        images: result.images,
        priceUsd: payments.enabled ? (result.cost?.usd ?? null) : null,
        transaction,
        transactionUrl: explorerLink(payments.chain?.explorerUrl ?? null, transaction),
      };
      const next = [entry, ...gallery.filter((e) => e.id !== entry.id)];
      setGallery(next);
      saveGallery(next);
      pending.current = null;
      setProblem(null);
      setStatus(
        `Done: ${result.images.length} image${result.images.length === 1 ? "" : "s"}${entry.priceUsd ? ` for $${entry.priceUsd}` : ""}.`,
      );
      window.setTimeout(() => document.getElementById(`entry-${entry.id}`)?.focus(), 0);
      void refreshWallet(wallet);
      void loadConfig().then(setConfig, () => undefined);
      return;
    }
    const apiError = await apiErrorOf(response);
    if (apiError.code === "SETTLEMENT_PENDING") pending.current = { sent, body, model: usedModel };
    setProblem(explainFailure(apiError));
    setStatus("");
    void refreshWallet(wallet);
  };

  const generate = async () => {
    setAttempted(true);
    setProblem(null);
    const fieldErrors = validate(settings, model, config.limits, { needPrompt: true });
    if (Object.keys(fieldErrors).length > 0) {
      setStatus("");
      setProblem({ title: "Check the settings", text: "Some settings need fixing before anything is paid; each one says what is wrong." });
      focusFirstInvalid(fieldErrors);
      return;
    }
    if (priceError) {
      setProblem(explainFailure(priceError));
      focusFirstInvalid(shownErrors);
      return;
    }
    if (!model.available) {
      setProblem({ title: "This model cannot run now", text: `${model.unavailableReason ?? "It is unavailable on this server."} Nothing was charged; pick another model.` });
      return;
    }
    const body = requestBody(settings, model, { withPrompt: true });
    if (pending.current && JSON.stringify(pending.current.body) === JSON.stringify(body)) {
      // These settings were paid for and the transfer is still unconfirmed: never sign twice.
      await checkAgain();
      return;
    }
    let amount = priceAmount;
    if (payments.enabled && amount === null) {
      // Settings changed a moment ago: price them now, and show that price before it is signed.
      try {
        const fresh = await fetchEstimate(requestBody(settings, model, { withPrompt: false }), new AbortController().signal);
        setPrice({ key: priceKey, estimate: fresh, loading: false, error: null });
        amount = BigInt(fresh.estimatedCost.amount);
      } catch (error) {
        setProblem(explainFailure(error));
        return;
      }
    }
    const requestId = newRequestId();
    let watch: { stop(): void } | null = null;
    const startProgress = () => {
      setPhase("generating");
      setStatus("Generating your images…");
      watch = watchProgress(requestId, typicalS, setProgress, JOB_EVENTS);
    };
    try {
      let sent: Sent;
      if (!payments.enabled) {
        startProgress();
        sent = await generateFree(body, requestId);
      } else {
        if (!wallet || !payments.chain || !payments.network || amount === null) {
          setProblem({ title: "Connect a wallet first", text: "Choose a wallet in the Wallet section to pay for these images.", action: "connect" });
          return;
        }
        setPhase("preparing");
        setStatus("Checking your wallet…");
        const currentChain = await wallet.chainId();
        setChainId(currentChain);
        if (currentChain !== payments.chain.chainId) {
          setProblem({
            title: "Wrong network",
            text: `Your wallet is on chain ${currentChain}; payments here are on ${payments.chain.name} (chain ${payments.chain.chainId}). Switch networks, then pay. Nothing was charged.`,
            action: "switch-network",
          });
          setStatus("");
          return;
        }
        const currentBalance = await wallet.balance(payments);
        setBalance(currentBalance);
        if (currentBalance < amount) {
          setProblem({
            title: "Insufficient balance",
            text: `Your account holds ${formatUsdc(currentBalance, payments.decimals)} on ${payments.chain.name}, and these images cost ${formatUsdc(amount, payments.decimals)}. Nothing was signed or charged.`,
          });
          setStatus("");
          return;
        }
        sent = await generatePaid(body, {
          wallet,
          network: payments.network,
          expectedAmount: amount.toString(),
          requestId,
          onSigning: () => {
            setPhase("signing");
            setStatus(
              wallet.kind === "test"
                ? "Signing the payment with the test wallet…"
                : `Confirm the payment of ${formatUsdc(amount as bigint, payments.decimals)} in ${wallet.name}: one signature, no gas.`,
            );
          },
          onSigned: startProgress,
        });
      }
      await finish(sent.response, body, model, sent);
    } catch (error) {
      setProblem(explainFailure(error));
      setStatus("");
      // A new estimate replaces the stale price before the visitor tries again.
      if (error instanceof PriceChanged) setSettings({ ...settings });
    } finally {
      (watch as { stop(): void } | null)?.stop();
      setProgress(null);
      setPhase("idle");
    }
  };

  const checkAgain = async () => {
    const held = pending.current;
    if (!held?.sent.resend) return;
    setPhase("checking");
    setStatus("Asking whether your payment has confirmed…");
    try {
      const response = await held.sent.resend();
      if (response.status === 202) {
        const apiError = await apiErrorOf(response);
        setProblem({ ...explainFailure(apiError), title: "Still waiting for the chain" });
        setStatus("");
      } else {
        await finish(response, held.body, held.model, held.sent);
      }
    } catch (error) {
      setProblem(explainFailure(error));
    } finally {
      setPhase("idle");
    }
  };

  const onProblemAction = () => {
    switch (problem?.action) {
      case "switch-network":
        void switchNetwork();
        break;
      case "check-again":
        void checkAgain();
        break;
      case "connect":
        document.getElementById("wallet-heading")?.scrollIntoView();
        (document.querySelector(".wallet button") as HTMLElement | null)?.focus();
        break;
      default:
        void generate();
    }
  };

  const reuse = (entry: GalleryEntry, seed: number) => {
    const restored = settingsFromRequest(entry.request, seed);
    if (!models.some((m) => m.id === restored.model)) restored.model = model.id;
    setSettings(restored);
    setStatus(`Settings restored from “${entry.prompt}” with seed ${seed}.`);
    window.setTimeout(() => document.getElementById("prompt")?.focus(), 0);
  };

  const priceText = (() => {
    if (currentEstimate) {
      const cost = currentEstimate.estimatedCost;
      const images = `${currentEstimate.number_of_images} image${currentEstimate.number_of_images === 1 ? "" : "s"}, ${currentEstimate.dimensions.replace("×", " × ")}, ${currentEstimate.steps} steps`;
      return payments.enabled ? `$${cost.usd} (${formatUsdc(BigInt(cost.amount), cost.decimals)}) for ${images}` : `Free: ${images}`;
    }
    if (price.loading) return "Working out the price…";
    if (priceError) return "No price: these settings would be refused (see above).";
    return "No price yet: fix the settings marked above.";
  })();
  const fraction = progress ? fractionDone(progress) : null;
  const payLabel = !payments.enabled
    ? "Generate (free)"
    : currentEstimate
      ? `Pay $${currentEstimate.estimatedCost.usd} and generate`
      : "Pay and generate";

  return (
    <>
      <a class="skip-link" href="#prompt">
        Skip to the prompt
      </a>
      <header class="top">
        <h1>imagegate playground</h1>
        <p class="tagline">Type a prompt, see the price, pay from your wallet, get your images.</p>
        {payments.enabled && payments.testChain && (
          <p class="banner test-chain" role="note">
            <strong>Test chain.</strong> Payments on this server run on a local test chain on this machine (chain id{" "}
            {payments.chain?.chainId}, posing as Base Sepolia) with a test USDC: no real money moves. Use the dev-chain test wallet below, or a
            wallet pointed at this chain.
          </p>
        )}
        {!payments.enabled && (
          <p class="banner free" role="note">
            <strong>Payments are switched off</strong> on this server: generating is free and needs no wallet.
          </p>
        )}
      </header>
      <main id="main" class="layout">
        <form
          class="panel compose"
          aria-labelledby="compose-heading"
          noValidate
          onSubmit={(event) => {
            event.preventDefault();
            if (!busy) void generate();
          }}
        >
          <h2 id="compose-heading">Settings</h2>
          <SettingsForm settings={settings} models={models} model={model} limits={config.limits} errors={shownErrors} onChange={update} />
          <p class="price">
            <span class="label">Price</span>{" "}
            <output id="price" for="prompt model size numberResults steps" aria-live="polite">
              {priceText}
            </output>
          </p>
          <button type="submit" class="primary" disabled={busy} aria-describedby="price">
            {payLabel}
          </button>
        </form>

        <div class="side">
          {payments.enabled && (
            <WalletPanel
              payments={payments}
              wallets={wallets}
              wallet={wallet}
              chainId={chainId}
              balance={balance}
              priceAmount={priceAmount}
              offerTestWallet={payments.testChain && config.testWallet !== null}
              busy={busy}
              onConnect={(found) => void connect(found)}
              onUseTestWallet={useTestWallet}
              onSwitch={() => void switchNetwork()}
              onDisconnect={disconnect}
            />
          )}
          <section class="panel activity" aria-labelledby="activity-heading">
            <h2 id="activity-heading">Status</h2>
            <p role="status" class="status">
              {status || (busy || problem ? "" : "Ready.")}
            </p>
            {progress && (
              <div class="progress">
                <progress max={1} value={fraction ?? undefined} aria-label="Generation progress" aria-valuetext={describeProgress(progress)} />
                <p class="progress-text">{describeProgress(progress)}</p>
              </div>
            )}
            {problem && (
              <ProblemBox problem={problem} explorerUrl={payments.chain?.explorerUrl ?? null} onAction={onProblemAction} busy={busy} />
            )}
          </section>
        </div>

        <section class="panel results" aria-labelledby="gallery-heading">
          <h2 id="gallery-heading">Your images</h2>
          <Gallery entries={gallery} testChain={payments.testChain} onReuse={reuse} />
        </section>
      </main>
      <footer class="bottom">
        <p>
          Served by imagegate. Programs use the same API: <a href="openapi.json">OpenAPI document</a>.
        </p>
      </footer>
    </>
  );
}
