// The settings form: every control labelled, its limits said beside it, its error tied to it
// (aria-describedby / aria-invalid) so that keyboard and screen-reader users get the same page.

import type { ComponentChildren } from "preact";
import type { Limits, ModelInfo } from "./api";
import { type Field, type FieldErrors, SIZE_PRESETS, type Settings, dimensions } from "./settings";

interface FieldProps {
  id: Field;
  label: string;
  hint?: string;
  error?: string;
  children: (describedBy: string | undefined, invalid: boolean) => ComponentChildren;
}

function FieldBox({ id, label, hint, error, children }: FieldProps) {
  const ids = [hint ? `${id}-hint` : "", error ? `${id}-error` : ""].filter(Boolean).join(" ") || undefined;
  return (
    <div class={`field${error ? " field-invalid" : ""}`}>
      <label for={id}>{label}</label>
      {children(ids, Boolean(error))}
      {hint && (
        <p class="hint" id={`${id}-hint`}>
          {hint}
        </p>
      )}
      {error && (
        <p class="error-text" id={`${id}-error`}>
          {error}
        </p>
      )}
    </div>
  );
}

interface FormProps {
  settings: Settings;
  models: ModelInfo[];
  model: ModelInfo;
  limits: Limits;
  errors: FieldErrors;
  onChange: (patch: Partial<Settings>) => void;
}

export function SettingsForm({ settings, models, model, limits, errors, onChange }: FormProps) {
  const text = (field: Field) => (event: Event) => onChange({ [field]: (event.currentTarget as HTMLInputElement).value });
  const { width, height } = dimensions(settings, model);
  return (
    <div class="settings">
      <FieldBox id="prompt" label="Prompt" hint={`What to draw, ${limits.minPrompt}–${limits.maxPrompt} characters.`} error={errors.prompt}>
        {(describedBy, invalid) => (
          <textarea
            id="prompt"
            name="prompt"
            rows={3}
            maxLength={limits.maxPrompt}
            value={settings.prompt}
            onInput={text("prompt")}
            aria-describedby={describedBy}
            aria-invalid={invalid}
            placeholder="a large orange triangle on a blue background"
          />
        )}
      </FieldBox>

      <FieldBox
        id="model"
        label="Model"
        hint={[model.description, model.parameterNotes, model.available ? "" : `Unavailable: ${model.unavailableReason ?? "no reason given"}.`]
          .filter(Boolean)
          .join(" ")}
        error={errors.model}
      >
        {(describedBy) => (
          <select id="model" name="model" value={settings.model} onChange={text("model")} aria-describedby={describedBy}>
            {models.map((m) => (
              <option key={m.id} value={m.id}>
                {m.name}
                {m.available ? "" : " (unavailable)"}
              </option>
            ))}
          </select>
        )}
      </FieldBox>

      <FieldBox
        id="negativePrompt"
        label="Negative prompt (optional)"
        hint={model.supportsNegativePrompt ? "What to keep out of the image." : `${model.name} does not take a negative prompt.`}
        error={errors.negativePrompt}
      >
        {(describedBy, invalid) => (
          <textarea
            id="negativePrompt"
            name="negativePrompt"
            rows={2}
            maxLength={limits.maxNegativePrompt}
            value={settings.negativePrompt}
            onInput={text("negativePrompt")}
            disabled={!model.supportsNegativePrompt && !settings.negativePrompt}
            aria-describedby={describedBy}
            aria-invalid={invalid}
          />
        )}
      </FieldBox>

      <div class="row">
        <FieldBox id="size" label="Size" hint={`${width} × ${height} pixels.`} error={errors.size}>
          {(describedBy) => (
            <select id="size" name="size" value={settings.size} onChange={text("size")} aria-describedby={describedBy}>
              <option value="default">
                Model default, {model.defaultWidth} × {model.defaultHeight}
              </option>
              {SIZE_PRESETS.map((preset) => (
                <option key={preset.id} value={preset.id}>
                  {preset.label}
                </option>
              ))}
              <option value="custom">Custom size…</option>
            </select>
          )}
        </FieldBox>
        <FieldBox id="numberResults" label="Images" hint={`${limits.minResults} to ${limits.maxResults}.`} error={errors.numberResults}>
          {(describedBy, invalid) => (
            <input
              id="numberResults"
              name="numberResults"
              type="number"
              inputMode="numeric"
              min={limits.minResults}
              max={limits.maxResults}
              step={1}
              value={settings.numberResults}
              onInput={text("numberResults")}
              aria-describedby={describedBy}
              aria-invalid={invalid}
            />
          )}
        </FieldBox>
      </div>

      {settings.size === "custom" && (
        <div class="row">
          {(["width", "height"] as const).map((side) => (
            <FieldBox
              key={side}
              id={side}
              label={side === "width" ? "Width" : "Height"}
              hint={`${limits.minSide}–${limits.maxSide}, a multiple of ${limits.sideMultiple}.`}
              error={errors[side]}
            >
              {(describedBy, invalid) => (
                <input
                  id={side}
                  name={side}
                  type="number"
                  inputMode="numeric"
                  min={limits.minSide}
                  max={limits.maxSide}
                  step={limits.sideMultiple}
                  value={settings[side]}
                  onInput={text(side)}
                  aria-describedby={describedBy}
                  aria-invalid={invalid}
                />
              )}
            </FieldBox>
          ))}
        </div>
      )}

      <details class="advanced" open={Boolean(settings.steps || settings.guidance || settings.seed)}>
        <summary>More settings: steps, guidance, seed, format</summary>
        <div class="row">
          <FieldBox
            id="steps"
            label="Steps"
            hint={model.supportsSteps ? `${model.minSteps}–${model.maxSteps}; empty: ${model.defaultSteps}. More steps, more detail, higher price.` : `Fixed by ${model.name}.`}
            error={errors.steps}
          >
            {(describedBy, invalid) => (
              <input
                id="steps"
                name="steps"
                type="number"
                inputMode="numeric"
                min={model.minSteps}
                max={model.maxSteps}
                placeholder={String(model.defaultSteps)}
                value={settings.steps}
                onInput={text("steps")}
                disabled={!model.supportsSteps && !settings.steps}
                aria-describedby={describedBy}
                aria-invalid={invalid}
              />
            )}
          </FieldBox>
          <FieldBox
            id="guidance"
            label="Guidance"
            hint={
              model.supportsGuidance
                ? `${limits.minGuidance}–${limits.maxGuidance}; empty: ${model.defaultGuidance ?? "the model's"}. Higher follows the prompt more closely.`
                : `${model.name} does not take guidance.`
            }
            error={errors.guidance}
          >
            {(describedBy, invalid) => (
              <input
                id="guidance"
                name="guidance"
                type="number"
                inputMode="decimal"
                min={limits.minGuidance}
                max={limits.maxGuidance}
                step={0.5}
                placeholder={model.defaultGuidance === null ? "" : String(model.defaultGuidance)}
                value={settings.guidance}
                onInput={text("guidance")}
                disabled={!model.supportsGuidance && !settings.guidance}
                aria-describedby={describedBy}
                aria-invalid={invalid}
              />
            )}
          </FieldBox>
        </div>
        <div class="row">
          <FieldBox id="seed" label="Seed" hint="Empty: random. The same seed and settings give the same images; image i uses seed + i." error={errors.seed}>
            {(describedBy, invalid) => (
              <input
                id="seed"
                name="seed"
                type="text"
                inputMode="numeric"
                autoComplete="off"
                value={settings.seed}
                onInput={text("seed")}
                aria-describedby={describedBy}
                aria-invalid={invalid}
              />
            )}
          </FieldBox>
          <FieldBox id="outputFormat" label="Format" error={errors.outputFormat}>
            {(describedBy) => (
              <select id="outputFormat" name="outputFormat" value={settings.outputFormat} onChange={text("outputFormat")} aria-describedby={describedBy}>
                {limits.outputFormats.map((format) => (
                  <option key={format} value={format}>
                    {format.toUpperCase()}
                  </option>
                ))}
              </select>
            )}
          </FieldBox>
        </div>
      </details>
    </div>
  );
}
