"""Full-size FLUX.1-schnell and SDXL on a GPU: plain diffusers against imagegate's own settings.

The architectures are built from their public configurations (the ``config.json`` files of
``black-forest-labs/FLUX.1-schnell`` and ``stabilityai/stable-diffusion-xl-base-1.0``, written out
below) with random weights, directly on the GPU: nothing is downloaded, and speed and memory do not
depend on the weights' values. Prompts are token ids run through the (random) text encoders each
call, so text encoding is timed too; the tokenizers are not needed.

Measured, each a median of timed runs after warm-up (compilation happens in warm-up and is
reported on its own): 1024x1024 (FLUX 4 steps, SDXL 30 steps), one image and a batch of 4, and
2048x2048 with VAE tiling, for
- "diffusers defaults": the pipeline as ``from_pretrained(repo).to("cuda")`` gives it (float32, PyTorch SDPA);
- "bf16": the model cards' recipe (``torch_dtype=torch.bfloat16``);
- imagegate's settings, as its diffusers backend applies them (``backends.diffusers.apply_speed_options``
  with ``DiffusersOptions``): bf16 (its default on CUDA), the fastest attention backend this machine has,
  torch.compile of the repeated blocks, FP8 (torchao, compute capability 8.9+), CUDA graphs
  ("reduce-overhead"), VAE tiling for 2048x2048;
printing seconds per image, the ratio to the defaults and to bf16, and peak GPU memory.

Run on a GPU machine:  .venv/bin/python -m bench.bench_gpu [--budget-s 780] [--models flux,sdxl]
CPU smoke run (toy sizes, no compile; part of the test suite):  .venv/bin/python -m bench.bench_gpu --smoke
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from imagegate.backends.diffusers import DiffusersOptions, apply_speed_options

# --- the public configurations -------------------------------------------------------------------

FLUX_TRANSFORMER = {"attention_head_dim": 128, "guidance_embeds": False, "in_channels": 64,
                    "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19,
                    "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768,
                    "axes_dims_rope": [16, 56, 56]}
FLUX_VAE = {"act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "force_upcast": True, "in_channels": 3, "out_channels": 3, "latent_channels": 16, "layers_per_block": 2,
            "mid_block_add_attention": True, "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 0.3611,
            "shift_factor": 0.1159, "use_post_quant_conv": False, "use_quant_conv": False}
FLUX_SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                  "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
          "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu", "projection_dim": 768}
T5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 32128,
          "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
          "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6, "is_encoder_decoder": False}
SDXL_UNET = {"addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
             "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "in_channels": 4,
             "layers_per_block": 2, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
             "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "use_linear_projection": True, "norm_num_groups": 32}
SDXL_VAE = {"act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "force_upcast": True, "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
            "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 0.13025}
CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
          "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "gelu", "projection_dim": 1280}
SDXL_SCHEDULER = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                  "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1,
                  "timestep_spacing": "leading", "interpolation_type": "linear", "use_karras_sigmas": False}

# Toy sizes for the CPU smoke run: the same code paths, tiny tensors.
TOY = {
    "flux_transformer": {**FLUX_TRANSFORMER, "attention_head_dim": 16, "num_attention_heads": 2,
                         "joint_attention_dim": 32, "num_layers": 1, "num_single_layers": 1,
                         "pooled_projection_dim": 32, "axes_dims_rope": [4, 6, 6]},
    "vae": {"block_out_channels": [8, 8, 8, 8], "norm_num_groups": 4, "layers_per_block": 1, "sample_size": 64},
    "clip_l": {**CLIP_L, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1,
               "projection_dim": 32, "vocab_size": 1000},
    "t5": {**T5_XXL, "d_model": 32, "d_ff": 64, "d_kv": 8, "num_heads": 4, "num_layers": 1, "vocab_size": 1000},
    "sdxl_unet": {**SDXL_UNET, "attention_head_dim": [2, 2, 2], "block_out_channels": [8, 16, 32],
                  "cross_attention_dim": 64, "transformer_layers_per_block": [1, 1, 1], "norm_num_groups": 4,
                  "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 80,
                  "layers_per_block": 1, "sample_size": 8},
    "clip_g": {**CLIP_G, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
               "num_hidden_layers": 1, "projection_dim": 32, "vocab_size": 1000},
}
T5_TOKENS = 256  # FLUX.1-schnell's max_sequence_length
CLIP_TOKENS = 77


@dataclass(frozen=True)
class Workload:
    name: str
    size: int
    batch: int
    steps: int
    tiling: bool = False


@dataclass
class Result:
    model: str
    workload: Workload
    variant: str
    seconds_per_image: float | None = None
    peak_gib: float | None = None
    warmup_s: float | None = None
    note: str = ""


@dataclass
class Bench:
    device: torch.device
    smoke: bool
    budget_s: float
    started: float = field(default_factory=time.monotonic)
    results: list[Result] = field(default_factory=list)

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)


# --- building the pipelines ----------------------------------------------------------------------


def _vae(config: dict[str, Any], smoke: bool) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**({**config, **TOY["vae"]} if smoke else config))


def build_flux(device: torch.device, dtype: torch.dtype, smoke: bool) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device(device):
        transformer = FluxTransformer2DModel(**(TOY["flux_transformer"] if smoke else FLUX_TRANSFORMER))
        vae = _vae(FLUX_VAE, smoke)
        clip = CLIPTextModel(CLIPTextConfig(**(TOY["clip_l"] if smoke else CLIP_L)))
        t5 = T5EncoderModel(T5Config(**(TOY["t5"] if smoke else T5_XXL)))
    pipeline = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae, text_encoder=clip,
                            tokenizer=None, text_encoder_2=t5, tokenizer_2=None, transformer=transformer)
    pipeline.to(device=device, dtype=dtype)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def build_sdxl(device: torch.device, dtype: torch.dtype, smoke: bool) -> Any:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device(device):
        unet = UNet2DConditionModel(**(TOY["sdxl_unet"] if smoke else SDXL_UNET))
        vae = _vae(SDXL_VAE, smoke)
        clip_l = CLIPTextModel(CLIPTextConfig(**(TOY["clip_l"] if smoke else CLIP_L)))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**(TOY["clip_g"] if smoke else CLIP_G)))
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER)
    pipeline = StableDiffusionXLPipeline(vae=vae, text_encoder=clip_l, text_encoder_2=clip_g, tokenizer=None,
                                         tokenizer_2=None, unet=unet, scheduler=scheduler)
    pipeline.to(device=device, dtype=dtype)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _token_ids(vocab_size: int, length: int, batch: int, device: torch.device, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab_size, (batch, length), generator=generator).to(device)


def flux_call(pipeline: Any, workload: Workload) -> Callable[[], Any]:
    """One request: encode the prompt with both text encoders, then the pipeline (4 steps, no CFG)."""
    device = pipeline.transformer.device

    def run() -> Any:
        with torch.inference_mode():
            clip_ids = _token_ids(pipeline.text_encoder.config.vocab_size, CLIP_TOKENS, 1, device, 1)
            t5_ids = _token_ids(pipeline.text_encoder_2.config.vocab_size, T5_TOKENS, 1, device, 2)
            pooled = pipeline.text_encoder(clip_ids, output_hidden_states=False).pooler_output
            embeds = pipeline.text_encoder_2(t5_ids, output_hidden_states=False)[0]
            return pipeline(prompt_embeds=embeds, pooled_prompt_embeds=pooled, num_images_per_prompt=workload.batch,
                            num_inference_steps=workload.steps, guidance_scale=0.0, height=workload.size,
                            width=workload.size, max_sequence_length=T5_TOKENS, output_type="pt",
                            generator=torch.Generator(device).manual_seed(0)).images

    return run


def sdxl_call(pipeline: Any, workload: Workload) -> Callable[[], Any]:
    """One request: encode the prompt with both CLIPs (penultimate layers, as SDXL does), then 30 steps
    with classifier-free guidance 5.0 against an empty negative prompt."""
    device = pipeline.unet.device

    def run() -> Any:
        with torch.inference_mode():
            ids_l = _token_ids(pipeline.text_encoder.config.vocab_size, CLIP_TOKENS, 1, device, 1)
            ids_g = _token_ids(pipeline.text_encoder_2.config.vocab_size, CLIP_TOKENS, 1, device, 2)
            hidden_l = pipeline.text_encoder(ids_l, output_hidden_states=True).hidden_states[-2]
            out_g = pipeline.text_encoder_2(ids_g, output_hidden_states=True)
            embeds = torch.cat([hidden_l, out_g.hidden_states[-2]], dim=-1)
            pooled = out_g.text_embeds
            return pipeline(prompt_embeds=embeds, pooled_prompt_embeds=pooled,
                            negative_prompt_embeds=torch.zeros_like(embeds),
                            negative_pooled_prompt_embeds=torch.zeros_like(pooled),
                            num_images_per_prompt=workload.batch, num_inference_steps=workload.steps,
                            guidance_scale=5.0, height=workload.size, width=workload.size, output_type="pt",
                            generator=torch.Generator(device).manual_seed(0)).images

    return run


MODELS: dict[str, tuple[Callable[[torch.device, torch.dtype, bool], Any], Callable[[Any, Workload], Callable[[], Any]],
                        int]] = {
    "flux": (build_flux, flux_call, 4),
    "sdxl": (build_sdxl, sdxl_call, 30),
}


# --- the variants ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    name: str
    dtype: torch.dtype
    options: DiffusersOptions | None  # None: plain diffusers, nothing applied


def fastest_attention_backend(pipeline: Any, device: torch.device) -> str | None:
    """The first of the fast attention kernels this machine runs (diffusers' dispatcher checks)."""
    if device.type != "cuda":
        return "native"
    denoiser = getattr(pipeline, "transformer", None) or pipeline.unet
    for backend in ("_flash_3", "flash", "sage", "_native_cudnn", "_native_flash"):
        try:
            denoiser.set_attention_backend(backend)
        except (ImportError, RuntimeError, ValueError) as exc:
            print(f"  attention backend {backend}: not available ({str(exc)[:100]})", flush=True)
            continue
        denoiser.reset_attention_backend()
        return backend
    return None


def fp8_available(device: torch.device) -> bool:
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        return False
    try:
        import torchao  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return False
    return True


def variants(bench: Bench, pipeline_probe: Any) -> list[Variant]:
    """From the plainest to imagegate's fastest; the options are the diffusers backend's own."""
    half = torch.bfloat16 if bench.device.type == "cuda" else torch.float32
    attention = fastest_attention_backend(pipeline_probe, bench.device)
    listed = [Variant("diffusers defaults (float32, SDPA)", torch.float32, None),
              Variant("bf16 (the model cards' recipe)", half, None),
              Variant(f"imagegate: bf16 + attention {attention}", half, DiffusersOptions(attention_backend=attention))]
    if bench.smoke:
        return listed  # compiling even toy models on a CPU takes minutes
    listed.append(Variant(f"imagegate: + torch.compile (attention {attention})", half,
                          DiffusersOptions(attention_backend=attention, compile="max-autotune-no-cudagraphs")))
    if fp8_available(bench.device):
        listed.append(Variant("imagegate: + fp8 (torchao)", half, DiffusersOptions(
            attention_backend=attention, compile="max-autotune-no-cudagraphs", fp8=True)))
    else:
        print("  fp8: not available here (needs torchao and compute capability 8.9+)", flush=True)
    listed.append(Variant("imagegate: + CUDA graphs (compile reduce-overhead)", half, DiffusersOptions(
        attention_backend=attention, compile="reduce-overhead", fp8=fp8_available(bench.device))))
    return listed


# --- measuring -------------------------------------------------------------------------------------


def measure(bench: Bench, model: str, variant: Variant, workloads: list[Workload]) -> None:
    build, call, _ = MODELS[model]
    warmups, runs = (1, 1) if bench.smoke else (3 if variant.options and variant.options.compile != "off" else 1, 3)
    pipeline = None
    try:
        pipeline = build(bench.device, variant.dtype, bench.smoke)
        if variant.options is not None:
            apply_speed_options(pipeline, variant.options, bench.device)
        for workload in workloads:
            result = Result(model, workload, variant.name)
            bench.results.append(result)
            if bench.left_s() < (5 if bench.smoke else 60):
                result.note = "skipped: time budget spent"
                continue
            if variant.options is None and variant.dtype == torch.float32 and workload.size > 1024 \
                    and not bench.smoke:
                result.note = "not run: float32 at 2048x2048 is not a configuration anyone serves"
                continue
            pipeline.vae.disable_tiling()
            if workload.tiling:
                pipeline.vae.enable_tiling()
                if bench.smoke:
                    pipeline.vae.tile_sample_min_size = workload.size // 2
                    pipeline.vae.tile_latent_min_size = workload.size // 16
            run = call(pipeline, workload)
            try:
                started = time.perf_counter()
                for _ in range(warmups):
                    run()
                _synchronize(bench.device)
                result.warmup_s = time.perf_counter() - started
                _reset_peak(bench.device)
                times = []
                for _ in range(runs):
                    started = time.perf_counter()
                    images = run()
                    _synchronize(bench.device)
                    times.append(time.perf_counter() - started)
                assert tuple(images.shape[-2:]) == (workload.size, workload.size), images.shape
                result.seconds_per_image = statistics.median(times) / workload.batch
                result.peak_gib = _peak_gib(bench.device)
            except torch.OutOfMemoryError:
                result.note = "out of GPU memory"
                _free(bench.device)
            print(f"  {model} {workload.name} {variant.name}: {_describe(result)}", flush=True)
    finally:
        del pipeline
        _free(bench.device)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with contextlib.suppress(Exception):
        torch._dynamo.reset()


def _describe(result: Result) -> str:
    if result.seconds_per_image is None:
        return result.note or "not measured"
    peak = f", peak {result.peak_gib:.1f} GiB" if result.peak_gib is not None else ""
    return f"{result.seconds_per_image:.3f} s/image{peak} (warm-up {result.warmup_s:.1f} s)"


def report(bench: Bench) -> str:
    lines = ["| model | workload | variant | s/image | vs defaults | vs bf16 | peak GPU memory | warm-up |",
             "|---|---|---|---|---|---|---|---|"]
    for result in bench.results:
        same = [r for r in bench.results if r.model == result.model and r.workload == result.workload]
        defaults = next((r.seconds_per_image for r in same if r.variant.startswith("diffusers defaults")), None)
        bf16 = next((r.seconds_per_image for r in same if r.variant.startswith("bf16")), None)
        seconds = result.seconds_per_image
        lines.append("| " + " | ".join([
            result.model, result.workload.name, result.variant,
            f"{seconds:.3f}" if seconds else result.note or "-",
            f"{defaults / seconds:.2f}x" if seconds and defaults else "-",
            f"{bf16 / seconds:.2f}x" if seconds and bf16 else "-",
            f"{result.peak_gib:.1f} GiB" if result.peak_gib is not None else "-",
            f"{result.warmup_s:.0f} s" if result.warmup_s is not None else "-",
        ]) + " |")
    return "\n".join(lines)


@contextlib.contextmanager
def _threads(count: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (the test suite runs this)")
    parser.add_argument("--models", default="flux,sdxl")
    parser.add_argument("--budget-s", type=float, default=780.0, help="stop starting new measurements after this")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run with --smoke for the CPU smoke run")
    bench = Bench(device, args.smoke, args.budget_s if not args.smoke else max(args.budget_s, 600.0))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    with _threads(1 if args.smoke else None):
        for model in args.models.split(","):
            _, _, steps = MODELS[model]
            big, small = (128, 64) if args.smoke else (2048, 1024)
            steps = 2 if args.smoke else steps
            workloads = [Workload(f"{small}x{small}, 1 image, {steps} steps", small, 1, steps),
                         Workload(f"{small}x{small}, batch of 4, {steps} steps", small, 4, steps),
                         Workload(f"{big}x{big}, VAE tiling, {steps} steps", big, 1, steps, tiling=True)]
            # A toy build is enough to find which attention kernels run here.
            probe = MODELS[model][0](device, torch.bfloat16 if device.type == "cuda" else torch.float32, True)
            listed = variants(bench, probe)
            del probe
            for variant in listed:
                measure(bench, model, variant, workloads)
    print(report(bench), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump([{**r.__dict__, "workload": r.workload.__dict__} for r in bench.results], handle)
    return bench.results


if __name__ == "__main__":
    main(sys.argv[1:])
