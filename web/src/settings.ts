// The form's state, what it means as a request body, and what is wrong with it before the server is
// asked. The server stays the judge (its estimate answers every setting with the same validation as
// a paid request); checking here too lets the page explain a mistake as it is typed.

import type { Limits, ModelInfo } from "./api";

export interface SizePreset {
  id: string;
  label: string;
  width: number;
  height: number;
}

// The spec's common aspect ratios ("Supported Aspect Ratios"); "default" and "custom" come beside them.
export const SIZE_PRESETS: SizePreset[] = [
  { id: "512x512", label: "1:1 square, 512 × 512", width: 512, height: 512 },
  { id: "1024x1024", label: "1:1 square, 1024 × 1024", width: 1024, height: 1024 },
  { id: "2048x2048", label: "1:1 square, 2048 × 2048", width: 2048, height: 2048 },
  { id: "768x1024", label: "3:4 portrait, 768 × 1024", width: 768, height: 1024 },
  { id: "1024x768", label: "4:3 landscape, 1024 × 768", width: 1024, height: 768 },
  { id: "1280x768", label: "5:3 wide, 1280 × 768", width: 1280, height: 768 },
  { id: "1152x640", label: "16:9 widescreen, 1152 × 640", width: 1152, height: 640 },
  { id: "1920x1088", label: "16:9 widescreen, 1920 × 1088", width: 1920, height: 1088 },
  { id: "1344x576", label: "21:9 ultrawide, 1344 × 576", width: 1344, height: 576 },
];

export interface Settings {
  prompt: string;
  negativePrompt: string;
  model: string;
  // "default", a preset id, or "custom" (then width/height below).
  size: string;
  width: string;
  height: string;
  numberResults: string;
  // Empty: the model's default (steps, guidance) or a seed drawn by the server.
  steps: string;
  guidance: string;
  seed: string;
  outputFormat: string;
}

export type Field = keyof Settings;
export type FieldErrors = Partial<Record<Field, string>>;

export function initialSettings(model: ModelInfo, limits: Limits): Settings {
  return {
    prompt: "",
    negativePrompt: "",
    model: model.id,
    size: "default",
    width: String(model.defaultWidth),
    height: String(model.defaultHeight),
    numberResults: "1",
    steps: "",
    guidance: "",
    seed: "",
    outputFormat: limits.defaultOutputFormat,
  };
}

export function dimensions(settings: Settings, model: ModelInfo): { width: number; height: number } {
  if (settings.size === "default") return { width: model.defaultWidth, height: model.defaultHeight };
  const preset = SIZE_PRESETS.find((p) => p.id === settings.size);
  if (preset) return { width: preset.width, height: preset.height };
  return { width: Number(settings.width), height: Number(settings.height) };
}

const INTEGER = /^\d+$/;
const NUMBER = /^\d+(\.\d+)?$/;

/** What is wrong with the settings, field by field, in the words the page shows next to each field. */
export function validate(settings: Settings, model: ModelInfo, limits: Limits, { needPrompt }: { needPrompt: boolean }): FieldErrors {
  const errors: FieldErrors = {};
  const prompt = settings.prompt.trim();
  if (needPrompt && prompt.length < limits.minPrompt) {
    errors.prompt = `Describe the image in at least ${limits.minPrompt} characters.`;
  } else if (settings.prompt.length > limits.maxPrompt) {
    errors.prompt = `The prompt is ${settings.prompt.length} characters; the limit is ${limits.maxPrompt}.`;
  }
  if (settings.negativePrompt && !model.supportsNegativePrompt) {
    errors.negativePrompt = `${model.name} does not take a negative prompt; clear this field or pick another model.`;
  } else if (settings.negativePrompt.length > limits.maxNegativePrompt) {
    errors.negativePrompt = `The negative prompt is ${settings.negativePrompt.length} characters; the limit is ${limits.maxNegativePrompt}.`;
  }
  if (settings.size === "custom") {
    for (const side of ["width", "height"] as const) {
      const value = settings[side];
      const number = Number(value);
      if (!INTEGER.test(value) || number < limits.minSide || number > limits.maxSide || number % limits.sideMultiple) {
        errors[side] = `The ${side} must be a whole number from ${limits.minSide} to ${limits.maxSide}, divisible by ${limits.sideMultiple}.`;
      }
    }
  }
  const count = Number(settings.numberResults);
  if (!INTEGER.test(settings.numberResults) || count < limits.minResults || count > limits.maxResults) {
    errors.numberResults = `Choose ${limits.minResults} to ${limits.maxResults} images.`;
  }
  if (settings.steps !== "") {
    const steps = Number(settings.steps);
    if (!model.supportsSteps) {
      errors.steps = `${model.name} has a fixed number of steps; clear this field.`;
    } else if (!INTEGER.test(settings.steps) || steps < model.minSteps || steps > model.maxSteps) {
      errors.steps = `${model.name} takes ${model.minSteps} to ${model.maxSteps} steps.`;
    }
  }
  if (settings.guidance !== "") {
    const guidance = Number(settings.guidance);
    if (!model.supportsGuidance) {
      errors.guidance = `${model.name} does not take a guidance scale; clear this field.`;
    } else if (!NUMBER.test(settings.guidance) || guidance < limits.minGuidance || guidance > limits.maxGuidance) {
      errors.guidance = `Guidance goes from ${limits.minGuidance} to ${limits.maxGuidance}.`;
    }
  }
  if (settings.seed !== "" && (!INTEGER.test(settings.seed) || Number(settings.seed) > limits.maxSeed)) {
    errors.seed = `A seed is a whole number from 0 to ${limits.maxSeed}; leave it empty for a random one.`;
  }
  return errors;
}

/** The JSON body of /v1/images/estimate and /v1/images/generate; defaults are left to the server. */
export function requestBody(settings: Settings, model: ModelInfo, { withPrompt }: { withPrompt: boolean }): Record<string, unknown> {
  const { width, height } = dimensions(settings, model);
  const body: Record<string, unknown> = { model: model.id, width, height, numberResults: Number(settings.numberResults) };
  // The prompt does not change the price: the estimate goes without it (its limits are checked here).
  if (withPrompt) body.prompt = settings.prompt.trim();
  if (settings.negativePrompt) body.negativePrompt = settings.negativePrompt;
  if (settings.steps !== "") body.steps = Number(settings.steps);
  if (settings.guidance !== "") body.guidance = Number(settings.guidance);
  if (settings.seed !== "") body.seed = Number(settings.seed);
  body.outputFormat = settings.outputFormat;
  return body;
}

/** The settings that produced a request body again (for "use these settings again"). */
export function settingsFromRequest(body: Record<string, unknown>, seed: number | null): Settings {
  const width = Number(body.width);
  const height = Number(body.height);
  const preset = SIZE_PRESETS.find((p) => p.width === width && p.height === height);
  const text = (value: unknown): string => (value === undefined || value === null ? "" : String(value));
  return {
    prompt: text(body.prompt),
    negativePrompt: text(body.negativePrompt),
    model: text(body.model),
    size: preset ? preset.id : "custom",
    width: String(width),
    height: String(height),
    numberResults: text(body.numberResults) || "1",
    steps: text(body.steps),
    guidance: text(body.guidance),
    seed: seed === null ? text(body.seed) : String(seed),
    outputFormat: text(body.outputFormat) || "png",
  };
}
