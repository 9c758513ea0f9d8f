// Progress of one generation, as the page shows it. Today the page knows the elapsed time and the
// model's typical render time on this server. Once the server streams a request's job events (looked
// up by the X-Request-ID the page sends with each generation), a `JobEvents` subscription passed to
// `watchProgress` feeds them in, and the same view shows the place in line and the steps.

export interface Progress {
  elapsedS: number;
  // Recent render time of this model on this server; null when it has not rendered it yet.
  typicalS: number | null;
  // From the job events, when the server sends them.
  queuePosition: number | null;
  step: number | null;
  totalSteps: number | null;
}

/** One job event, as the server's RenderProgress: waiting in line, started, a denoising step done. */
export type JobEvent =
  | { kind: "queued"; position: number }
  | { kind: "running" }
  | { kind: "step"; step: number; totalSteps: number };

/** Subscribes to the events of request `requestId`; returns the unsubscribe function. */
export type JobEvents = (requestId: string, onEvent: (event: JobEvent) => void) => () => void;

export interface ProgressWatch {
  stop(): void;
}

const TICK_MS = 250;

export function applyEvent(progress: Progress, event: JobEvent): Progress {
  switch (event.kind) {
    case "queued":
      return { ...progress, queuePosition: event.position };
    case "running":
      return { ...progress, queuePosition: null };
    case "step":
      return { ...progress, queuePosition: null, step: event.step, totalSteps: event.totalSteps };
  }
}

/** Calls `onUpdate` with the progress of request `requestId` (elapsed time, and events when given) until `stop()`. */
export function watchProgress(
  requestId: string,
  typicalS: number | null,
  onUpdate: (progress: Progress) => void,
  events?: JobEvents,
): ProgressWatch {
  const started = performance.now();
  let latest: Progress = { elapsedS: 0, typicalS, queuePosition: null, step: null, totalSteps: null };
  const emit = () => {
    latest = { ...latest, elapsedS: (performance.now() - started) / 1000 };
    onUpdate(latest);
  };
  const unsubscribe = events?.(requestId, (event) => {
    latest = applyEvent(latest, event);
    emit();
  });
  emit();
  const timer = window.setInterval(emit, TICK_MS);
  return {
    stop() {
      window.clearInterval(timer);
      unsubscribe?.();
    },
  };
}

/** The progress in words, for the status line (also read out by screen readers, so kept short). */
export function describeProgress(progress: Progress): string {
  const elapsed = `${Math.floor(progress.elapsedS)} s`;
  if (progress.queuePosition !== null) {
    return progress.queuePosition === 0
      ? `Next in line… ${elapsed}`
      : `Waiting in line: ${progress.queuePosition} ahead of you… ${elapsed}`;
  }
  if (progress.step !== null && progress.totalSteps) {
    return `Step ${progress.step} of ${progress.totalSteps}… ${elapsed}`;
  }
  if (progress.typicalS === null) {
    return `Generating… ${elapsed} (no typical time yet: the first render of a model on this server also loads it)`;
  }
  const typical = Math.max(1, Math.round(progress.typicalS));
  return progress.elapsedS <= progress.typicalS * 1.5
    ? `Generating… ${elapsed} of about ${typical} s`
    : `Generating… ${elapsed}; it usually takes about ${typical} s, the server may be busy`;
}

/** 0..1 for the progress bar, or null when there is nothing to measure against. */
export function fractionDone(progress: Progress): number | null {
  if (progress.step !== null && progress.totalSteps) return progress.step / progress.totalSteps;
  if (progress.typicalS === null || progress.typicalS <= 0) return null;
  // Approaches but never reaches the end on its own: only the answer finishes it.
  return Math.min(0.95, progress.elapsedS / progress.typicalS);
}
