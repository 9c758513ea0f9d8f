"""Train imagegate-tiny from nothing: ``python -m imagegate.tinymodel.train --out training-runs/<name>``.

Stages, each checkpointed under ``--out`` and skipped when already done (``--resume`` continues an
interrupted stage where it stopped):

1. ``vae``: the autoencoder, on random crops of freshly rendered scenes.
2. ``dataset``: render the captioned scenes once per resolution bucket and encode them to latents,
   so the denoiser loop below does nothing but denoiser steps.
3. ``denoiser``: text encoder + UNet, v-prediction on a zero-terminal-SNR schedule, 10% empty
   captions (classifier-free guidance and negative prompts need an unconditional model), an EMA
   copy of the weights that is what gets exported.
4. ``export``: a standard diffusers pipeline folder (``save_pretrained``), also written every
   ``--export-every`` minutes so an interrupted run still leaves a usable model.

Every random choice comes from ``--seed``; batch ``k`` of a stage depends only on (seed, k), so a
resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import CLIPTextModel, CLIPTokenizer

from imagegate.tinymodel.architecture import (
    TinyConfig,
    assemble_pipeline,
    build_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    parameter_count,
)
from imagegate.tinymodel.data import Scene, render_scene

console = Console()


@dataclass(frozen=True)
class Bucket:
    """Scenes rendered at one pixel size; a denoiser batch never mixes buckets."""

    width: int
    height: int
    scenes: int
    batch_size: int
    weight: float  # share of denoiser steps drawn from this bucket


@dataclass(frozen=True)
class TrainConfig:
    model: TinyConfig = field(default_factory=TinyConfig)
    seed: int = 20261124
    vae_steps: int = 3300
    vae_batch: int = 10
    vae_crop: int = 96
    vae_lr: float = 1e-3
    # Then the decoder alone, on larger crops: the encoder (and so every latent) stays fixed, so
    # this stage can run beside the denoiser's.
    decoder_steps: int = 1600
    decoder_batch: int = 6
    decoder_crop: int = 128
    decoder_lr: float = 4e-4
    # Several sizes and aspect ratios, so relative sizes, positions and counts hold at 512 px too.
    buckets: tuple[Bucket, ...] = (
        Bucket(256, 256, 9000, 24, 0.70),
        Bucket(384, 256, 1000, 16, 0.10),
        Bucket(256, 384, 1000, 16, 0.10),
        Bucket(512, 512, 1500, 6, 0.10),
    )
    denoiser_steps: int = 10800
    denoiser_lr: float = 1e-3
    denoiser_min_lr: float = 5e-5  # cosine decay from denoiser_lr to this at the last step
    warmup_steps: int = 200
    # Latent pixels under an object weigh 1 + this much in the denoiser loss, fading linearly to
    # nothing at ``object_weight_until``. Objects cover ~5% of a scene: unweighted, the loss is almost
    # all background, and a CPU-sized run learns the background words long before the objects'
    # colours. But the weight also biases the optimum towards painting an object wherever one might
    # be (too many blobs), so the last part of the run is unweighted.
    object_loss_weight: float = 5.0
    object_weight_until: int = 6000
    ema_decay: float = 0.998
    caption_dropout: float = 0.1
    checkpoint_minutes: float = 4.0
    export_minutes: float = 15.0
    # One thread by default: on a shared 2-core machine, two OpenMP threads wait on each other and
    # run ~5x slower. On an otherwise idle machine ``--threads 2`` is faster.
    threads: int = 1

    @classmethod
    def smoke(cls) -> TrainConfig:
        return cls(
            model=TinyConfig.smoke(), vae_steps=3, vae_batch=2, vae_crop=32, decoder_steps=2, decoder_batch=2,
            decoder_crop=32,
            buckets=(Bucket(64, 64, 12, 4, 0.7), Bucket(96, 64, 6, 2, 0.3)),
            denoiser_steps=4, warmup_steps=1, object_weight_until=3, checkpoint_minutes=0.0, export_minutes=1e9,
            threads=1,
        )


@dataclass
class RunPaths:
    root: Path
    vae: Path = field(init=False)
    decoder: Path = field(init=False)
    dataset: Path = field(init=False)
    denoiser: Path = field(init=False)
    export: Path = field(init=False)

    def __post_init__(self) -> None:
        self.vae = self.root / "vae.pt"
        self.decoder = self.root / "decoder.pt"
        self.dataset = self.root / "dataset.pt"
        self.denoiser = self.root / "denoiser.pt"
        self.export = self.root / "export"


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), TextColumn("{task.fields[status]}"), console=console, refresh_per_second=1,
        # A log file (nohup) gets one line per update instead of a live bar.
        redirect_stdout=False,
    )


class _LogLines:
    """Where no live bar can be drawn (a log file under nohup), print a plain line every so often."""

    def __init__(self, every_seconds: float = 30.0):
        self.every = every_seconds
        self.last = time.monotonic()

    def maybe(self, stage: str, step: int, total: int, status: str) -> None:
        if console.is_terminal or time.monotonic() - self.last < self.every:
            return
        self.last = time.monotonic()
        console.print(f"{time.strftime('%H:%M:%S')} {stage} {step}/{total} {status}", highlight=False)


def _step_generator(seed: int, stage: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + stage * 7_919 + step)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _to_tensor(image: Any) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


# --- stage 1: autoencoder ---------------------------------------------------------------------

def _reconstruction_loss(recon: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L1 + MSE, with pixels unlike the crop's median colour (objects, mostly) weighted 8x.

    Objects cover a few percent of the pixels; unweighted, the autoencoder learns backgrounds and
    paints every object a blur of the wrong colour.
    """
    median = images.flatten(2).median(dim=2).values[:, :, None, None]
    is_object = ((images - median).abs().amax(dim=1, keepdim=True) > 0.25).float()
    weight = 1.0 + 7.0 * is_object
    error = recon - images
    l1 = error.abs().mean()
    loss = (weight * (error.abs() + error.pow(2))).mean() / weight.mean()
    return loss, l1


def _vae_batch(config: TrainConfig, step: int, batch: int | None = None, crop: int | None = None,
               stream: int = 0) -> torch.Tensor:
    batch, crop = batch or config.vae_batch, crop or config.vae_crop
    rng = random.Random(config.seed * 31 + stream * 1_000_003 + step)
    crops = []
    for i in range(batch):
        size = max(crop, rng.choice([256, 256, 384, 512]))
        image, _ = render_scene(10_000_000 * (stream + 1) + step * batch + i, size, size)
        x, y = rng.randrange(0, size - crop + 1), rng.randrange(0, size - crop + 1)
        crops.append(_to_tensor(image.crop((x, y, x + crop, y + crop))))
    return torch.stack(crops)


def train_vae(config: TrainConfig, paths: RunPaths, resume: bool) -> AutoencoderKL:
    torch.manual_seed(config.seed)
    vae = build_vae(config.model)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    start = 0
    if paths.vae.exists():
        state = torch.load(paths.vae, weights_only=False)
        vae.load_state_dict(state["vae"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        if start >= config.vae_steps:
            return vae.eval()
        if not resume:
            raise SystemExit(f"{paths.vae} holds an unfinished VAE run: pass --resume")
    console.print(f"VAE: {parameter_count(vae):,} parameters, factor {config.model.vae_scale_factor}")
    vae.train()
    last_save = time.monotonic()
    smoothed = None
    log = _LogLines()
    with _progress() as progress:
        task = progress.add_task("vae", total=config.vae_steps, completed=start, status="")
        for step in range(start, config.vae_steps):
            images = _vae_batch(config, step)
            # A deterministic autoencoder (posterior mean) with a little latent noise: sampling the
            # untrained posterior (std ~1) drowns the signal, while mild noise keeps the decoder
            # tolerant of the denoiser's small errors.
            latents = vae.encode(images).latent_dist.mean
            noise = torch.randn(latents.shape, generator=_step_generator(config.seed, 1, step))
            recon = vae.decode(latents + 0.1 * latents.detach().std() * noise).sample
            loss, l1 = _reconstruction_loss(recon, images)
            loss = loss + 1e-4 * latents.pow(2).mean()  # the last term only stops the scale drifting
            cosine = 0.5 * (1 + math.cos(math.pi * step / config.vae_steps))
            lr = config.vae_lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * cosine)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            smoothed = loss.item() if smoothed is None else 0.95 * smoothed + 0.05 * loss.item()
            status = f"loss {smoothed:.4f} (l1 {l1.item():.4f})"
            progress.update(task, advance=1, status=status)
            log.maybe("vae", step + 1, config.vae_steps, status)
            done = step + 1 == config.vae_steps
            if done or time.monotonic() - last_save > config.checkpoint_minutes * 60:
                checkpoint = {"vae": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1}
                _atomic_save(checkpoint, paths.vae)
                last_save = time.monotonic()
    return vae.eval()


def _decoder_modules(vae: AutoencoderKL) -> torch.nn.ModuleDict:
    """Everything after the latent: what the decoder stage trains."""
    modules: dict[str, torch.nn.Module] = {"decoder": vae.decoder}
    if vae.post_quant_conv is not None:
        modules["post_quant_conv"] = vae.post_quant_conv
    return torch.nn.ModuleDict(modules)


def train_decoder(config: TrainConfig, paths: RunPaths, vae: AutoencoderKL, resume: bool) -> AutoencoderKL:
    """Sharpen the decoder with the encoder frozen; returns ``vae`` with the tuned decoder loaded."""
    decoder_modules = _decoder_modules(vae)
    optimizer = torch.optim.AdamW(decoder_modules.parameters(), lr=config.decoder_lr, weight_decay=0.0)
    start = 0
    if paths.decoder.exists():
        state = torch.load(paths.decoder, weights_only=False)
        decoder_modules.load_state_dict(state["decoder"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        if start >= config.decoder_steps:
            return vae.eval()
        if not resume:
            raise SystemExit(f"{paths.decoder} holds an unfinished decoder run: pass --resume")
    vae.eval()
    decoder_modules.train()
    last_save = time.monotonic()
    smoothed = None
    log = _LogLines()
    with _progress() as progress:
        task = progress.add_task("decoder", total=config.decoder_steps, completed=start, status="")
        for step in range(start, config.decoder_steps):
            images = _vae_batch(config, step, config.decoder_batch, config.decoder_crop, stream=1)
            with torch.no_grad():
                latents = vae.encode(images).latent_dist.mean
            noise = torch.randn(latents.shape, generator=_step_generator(config.seed, 2, step))
            recon = vae.decode(latents + 0.1 * latents.std() * noise).sample
            loss, l1 = _reconstruction_loss(recon, images)
            lr = config.decoder_lr * 0.5 * (1 + math.cos(math.pi * step / config.decoder_steps))
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(decoder_modules.parameters(), 1.0)
            optimizer.step()
            smoothed = loss.item() if smoothed is None else 0.95 * smoothed + 0.05 * loss.item()
            status = f"loss {smoothed:.4f} (l1 {l1.item():.4f})"
            progress.update(task, advance=1, status=status)
            log.maybe("decoder", step + 1, config.decoder_steps, status)
            done = step + 1 == config.decoder_steps
            if done or time.monotonic() - last_save > config.checkpoint_minutes * 60:
                _atomic_save({"decoder": decoder_modules.state_dict(), "optimizer": optimizer.state_dict(),
                              "step": step + 1}, paths.decoder)
                last_save = time.monotonic()
    return vae.eval()


def _load_tuned_decoder(vae: AutoencoderKL, paths: RunPaths) -> AutoencoderKL:
    """The VAE with the decoder stage's weights, where that stage has saved any."""
    tuned = copy.deepcopy(vae)
    if paths.decoder.exists():
        modules = _decoder_modules(tuned)
        modules.load_state_dict(torch.load(paths.decoder, weights_only=False)["decoder"])
    return tuned.eval()


# --- stage 2: pre-encoded dataset ---------------------------------------------------------------

def object_mask(scene: Scene, width: int, height: int, factor: int) -> torch.Tensor:
    """(height/factor, width/factor) mask of the latent pixels that any drawn object touches."""
    ys = (torch.arange(height // factor, dtype=torch.float32) + 0.5) * factor
    xs = (torch.arange(width // factor, dtype=torch.float32) + 0.5) * factor
    mask = torch.zeros(len(ys), len(xs), dtype=torch.bool)
    for _, _, cx, cy, diameter in scene.objects:
        # A latent pixel covers factor x factor image pixels: count it when its square reaches the object.
        reach = diameter / 2 + factor / 2
        mask |= ((ys[:, None] - cy) ** 2 + (xs[None, :] - cx) ** 2) < reach**2
    return mask


def _add_object_masks(config: TrainConfig, dataset: dict[str, Any]) -> bool:
    """Give every bucket its scenes' object masks (re-drawn from the seeds); True when any were added."""
    next_seed, added = 0, False
    factor = config.model.vae_scale_factor
    for entry, bucket in zip(dataset["buckets"], config.buckets, strict=True):
        if "masks" not in entry:
            masks = [object_mask(render_scene(seed, bucket.width, bucket.height)[1], bucket.width, bucket.height,
                                 factor) for seed in range(next_seed, next_seed + bucket.scenes)]
            entry["masks"] = torch.stack(masks)
            added = True
        next_seed += bucket.scenes
    return added


def build_dataset(config: TrainConfig, paths: RunPaths, vae: AutoencoderKL) -> dict[str, Any]:
    if paths.dataset.exists():
        dataset: dict[str, Any] = torch.load(paths.dataset, weights_only=False)
        if _add_object_masks(config, dataset):  # a dataset encoded before masks existed
            _atomic_save(dataset, paths.dataset)
        return dataset
    buckets: list[dict[str, Any]] = []
    total = sum(b.scenes for b in config.buckets)
    chunk = 16
    next_seed = 0
    with _progress() as progress, torch.inference_mode():
        task = progress.add_task("encode scenes", total=total, status="")
        for bucket in config.buckets:
            latents, captions = [], []
            for first in range(0, bucket.scenes, chunk):
                seeds = range(next_seed + first, next_seed + min(first + chunk, bucket.scenes))
                rendered = [render_scene(seed, bucket.width, bucket.height) for seed in seeds]
                pixels = torch.stack([_to_tensor(image) for image, _ in rendered])
                latents.append(vae.encode(pixels).latent_dist.mean.to(torch.float16))
                captions += [scene.caption for _, scene in rendered]
                progress.update(task, advance=len(seeds), status=f"{bucket.width}x{bucket.height}")
            next_seed += bucket.scenes
            buckets.append({"bucket": asdict(bucket), "latents": torch.cat(latents), "captions": captions})
    flat = torch.cat([b["latents"].float().flatten() for b in buckets])
    std, mean = flat.std().item(), flat.mean().item()
    console.print(f"latents: mean {mean:.3f}, std {std:.3f} -> scaling factor {1 / std:.4f}")
    dataset = {"buckets": buckets, "scaling_factor": 1.0 / std}
    _add_object_masks(config, dataset)
    _atomic_save(dataset, paths.dataset)
    return dataset


# --- stage 3: denoiser --------------------------------------------------------------------------

def _tokenize(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    # Exactly how StableDiffusionPipeline tokenizes prompts, so training and inference agree.
    ids: torch.Tensor = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids
    return ids


class DenoiserState:
    def __init__(self, config: TrainConfig, tokenizer: CLIPTokenizer):
        torch.manual_seed(config.seed + 1)
        self.text_encoder: CLIPTextModel = build_text_encoder(config.model, tokenizer)
        self.unet: UNet2DConditionModel = build_unet(config.model)
        self.ema_text_encoder = copy.deepcopy(self.text_encoder).requires_grad_(False)
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
        params = [*self.text_encoder.parameters(), *self.unet.parameters()]
        self.optimizer = torch.optim.AdamW(params, lr=config.denoiser_lr, weight_decay=0.01)
        self.step = 0
        self.seconds = 0.0
        self.last_loss = math.nan

    def state_dict(self) -> dict[str, Any]:
        return {
            "text_encoder": self.text_encoder.state_dict(), "unet": self.unet.state_dict(),
            "ema_text_encoder": self.ema_text_encoder.state_dict(), "ema_unet": self.ema_unet.state_dict(),
            "optimizer": self.optimizer.state_dict(), "step": self.step, "seconds": self.seconds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.text_encoder.load_state_dict(state["text_encoder"])
        self.unet.load_state_dict(state["unet"])
        self.ema_text_encoder.load_state_dict(state["ema_text_encoder"])
        self.ema_unet.load_state_dict(state["ema_unet"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.seconds = state["step"], state.get("seconds", 0.0)

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        # Warm-up so early exports are not dominated by the random initialisation.
        decay = min(decay, (1 + self.step) / (10 + self.step))
        for ema, live in ((self.ema_text_encoder, self.text_encoder), (self.ema_unet, self.unet)):
            for e, p in zip(ema.parameters(), live.parameters(), strict=True):
                e.lerp_(p, 1 - decay)


def _denoiser_batch(config: TrainConfig, dataset: dict[str, Any],
                    step: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Scaled latents, their loss weights (objects heavier) and captions (some dropped)."""
    generator = _step_generator(config.seed, 3, step)
    bucket_weights = torch.tensor([b["bucket"]["weight"] for b in dataset["buckets"]])
    bucket = dataset["buckets"][int(torch.multinomial(bucket_weights, 1, generator=generator))]
    size = bucket["bucket"]["batch_size"]
    index = torch.randint(0, len(bucket["captions"]), (size,), generator=generator)
    latents = bucket["latents"][index].float() * dataset["scaling_factor"]
    fade = max(0.0, 1.0 - step / config.object_weight_until)
    weights = 1.0 + config.object_loss_weight * fade * bucket["masks"][index].float()[:, None]
    drop = torch.rand(size, generator=generator) < config.caption_dropout
    captions = ["" if dropped else bucket["captions"][i]
                for i, dropped in zip(index.tolist(), drop.tolist(), strict=True)]
    return latents, weights, captions


def _denoiser_lr(config: TrainConfig, step: int) -> float:
    warmup = min(1.0, (step + 1) / config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, step / config.denoiser_steps)))
    return warmup * (config.denoiser_min_lr + (config.denoiser_lr - config.denoiser_min_lr) * cosine)


def train_denoiser(config: TrainConfig, paths: RunPaths, resume: bool, tokenizer: CLIPTokenizer,
                   vae: AutoencoderKL, dataset: dict[str, Any], export_to: Path | None,
                   max_minutes: float | None = None) -> DenoiserState:
    state = DenoiserState(config, tokenizer)
    if paths.denoiser.exists():
        if not resume:
            raise SystemExit(f"{paths.denoiser} exists: pass --resume to continue it")
        state.load_state_dict(torch.load(paths.denoiser, weights_only=False))
        console.print(f"resumed the denoiser at step {state.step}")
    console.print(f"UNet {parameter_count(state.unet):,} + text encoder "
                  f"{parameter_count(state.text_encoder):,} parameters")
    alphas_cumprod = build_scheduler().alphas_cumprod.float()
    state.text_encoder.train()
    state.unet.train()
    last_save = last_export = time.monotonic()
    stop_at = time.monotonic() + max_minutes * 60 if max_minutes is not None else math.inf
    smoothed = None
    log = _LogLines()
    with _progress() as progress:
        task = progress.add_task("denoiser", total=config.denoiser_steps, completed=state.step, status="")
        while state.step < config.denoiser_steps:
            started = time.monotonic()
            latents, weights, captions = _denoiser_batch(config, dataset, state.step)
            generator = _step_generator(config.seed, 4, state.step)
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.randint(0, len(alphas_cumprod), (latents.shape[0],), generator=generator)
            alpha = alphas_cumprod[timesteps].sqrt().view(-1, 1, 1, 1)
            sigma = (1 - alphas_cumprod[timesteps]).sqrt().view(-1, 1, 1, 1)
            noisy = alpha * latents + sigma * noise
            target = alpha * noise - sigma * latents  # v-prediction
            hidden = state.text_encoder(_tokenize(tokenizer, captions)).last_hidden_state
            prediction = state.unet(noisy, timesteps, hidden).sample
            loss = (weights * (prediction - target).pow(2)).mean() / weights.mean()
            lr = _denoiser_lr(config, state.step)
            for group in state.optimizer.param_groups:
                group["lr"] = lr
            state.optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_([*state.text_encoder.parameters(), *state.unet.parameters()], 1.0)
            state.optimizer.step()
            state.step += 1
            state.update_ema(config.ema_decay)
            state.seconds += time.monotonic() - started
            state.last_loss = loss.item()
            if not math.isfinite(state.last_loss):
                raise FloatingPointError(f"loss became {loss.item()} at step {state.step}")
            smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
            status = f"loss {smoothed:.4f} {tuple(latents.shape[2:])} {state.seconds / max(1, state.step):.2f}s/step"
            progress.update(task, advance=1, status=status)
            log.maybe("denoiser", state.step, config.denoiser_steps, status)
            out_of_time = time.monotonic() > stop_at
            done = state.step == config.denoiser_steps or out_of_time
            if done or time.monotonic() - last_save > config.checkpoint_minutes * 60:
                _atomic_save(state.state_dict(), paths.denoiser)
                last_save = time.monotonic()
            if out_of_time:
                console.print(f"--max-minutes reached at step {state.step}; --resume continues from here")
                break
            if not done and time.monotonic() - last_export > config.export_minutes * 60:
                export(config, paths, tokenizer, vae, dataset["scaling_factor"], state, export_to)
                last_export = time.monotonic()
    return state


# --- stage 4: export ----------------------------------------------------------------------------

def export(config: TrainConfig, paths: RunPaths, tokenizer: CLIPTokenizer, vae: AutoencoderKL,
           scaling_factor: float, state: DenoiserState, export_to: Path | None) -> None:
    """Write the EMA weights as a diffusers pipeline, fp16 on disk (half the bytes; loaded back as float32)."""
    export_vae = _load_tuned_decoder(vae, paths)
    export_vae.register_to_config(scaling_factor=scaling_factor)  # type: ignore[no-untyped-call]
    pipeline = assemble_pipeline(tokenizer, copy.deepcopy(state.ema_text_encoder).eval(),  # type: ignore[no-untyped-call]
                                 export_vae,
                                 copy.deepcopy(state.ema_unet).eval())
    pipeline.to(torch.float16)
    tmp = paths.export.with_name("export.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipeline.save_pretrained(tmp, safe_serialization=True)
    (tmp / "training.txt").write_text(
        f"steps {state.step}\ntrain_seconds {state.seconds:.0f}\nseed {config.seed}\n", encoding="utf-8")
    shutil.rmtree(paths.export, ignore_errors=True)
    tmp.replace(paths.export)
    console.print(f"exported step {state.step} to {paths.export}")
    if export_to is not None:
        keep = export_to / "README.md"
        card = keep.read_text(encoding="utf-8") if keep.exists() else None
        shutil.rmtree(export_to, ignore_errors=True)
        shutil.copytree(paths.export, export_to)
        if card is not None:
            keep.write_text(card, encoding="utf-8")
        console.print(f"copied to {export_to}")


STAGES = ("all", "decoder", "denoiser", "export")


def run(out: Path, resume: bool = False, steps: int | None = None, smoke: bool = False,
        export_to: Path | None = None, stage: str = "all", max_minutes: float | None = None,
        threads: int | None = None) -> DenoiserState | None:
    """Run the pipeline into ``out``. ``stage`` other than "all" runs the shared prefix (VAE and
    dataset, skipped when done) and then only that stage: "decoder" and "denoiser" are independent
    of each other, so two processes can run them side by side on the same folder."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}")
    config = TrainConfig.smoke() if smoke else TrainConfig()
    if steps is not None:
        config = TrainConfig(**{**config.__dict__, "denoiser_steps": steps})
    if threads is not None:
        config = TrainConfig(**{**config.__dict__, "threads": threads})
    torch.set_num_threads(config.threads)
    random.seed(config.seed)
    np.random.seed(config.seed % 2**32)
    paths = RunPaths(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(config.model.max_tokens)
    vae = train_vae(config, paths, resume)
    dataset = build_dataset(config, paths, vae)
    if stage in ("all", "decoder"):
        train_decoder(config, paths, copy.deepcopy(vae), resume)
        if stage == "decoder":
            return None
    if stage == "export":
        state = DenoiserState(config, tokenizer)
        state.load_state_dict(torch.load(paths.denoiser, weights_only=False))
    else:
        state = train_denoiser(config, paths, resume, tokenizer, vae, dataset, export_to, max_minutes)
    export(config, paths, tokenizer, vae, dataset["scaling_factor"], state, export_to)
    return state


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="run folder for checkpoints (training-runs/<name>)")
    parser.add_argument("--resume", action="store_true", help="continue the checkpoints in --out")
    parser.add_argument("--steps", type=int, help="denoiser steps (default: the config's)")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run of a tiny config (CI)")
    parser.add_argument("--export-to", type=Path, help="also copy every export here (the package's model folder)")
    parser.add_argument("--stage", choices=STAGES, default="all",
                        help="after the VAE and dataset: everything (default), or one stage only; "
                             "'decoder' and 'denoiser' can run side by side, 'export' writes the latest checkpoint")
    parser.add_argument("--max-minutes", type=float, help="stop the denoiser (checkpointed, exported) after this long")
    parser.add_argument("--threads", type=int, help="torch threads (default 1: fastest on a shared 2-core machine)")
    args = parser.parse_args(argv)
    run(args.out, resume=args.resume, steps=args.steps, smoke=args.smoke, export_to=args.export_to, stage=args.stage,
        max_minutes=args.max_minutes, threads=args.threads)


if __name__ == "__main__":
    main()
