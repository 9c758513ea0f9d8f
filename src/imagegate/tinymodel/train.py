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
from collections.abc import Callable
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
        Bucket(256, 256, 16000, 24, 0.55),
        Bucket(384, 256, 2000, 16, 0.10),
        Bucket(256, 384, 2000, 16, 0.10),
        # A quarter of the steps at 512 px: a small star there spans 3-4 latent pixels, enough for its
        # shape, against under 2 at 256 px.
        Bucket(512, 512, 2500, 6, 0.25),
    )
    denoiser_steps: int = 25800
    # Cosine decay from denoiser_lr to denoiser_min_lr, then one warm restart (SGDR): from
    # restart_step on, cosine again from restart_lr to denoiser_min_lr at the last step.
    denoiser_lr: float = 1e-3
    denoiser_min_lr: float = 5e-5
    restart_step: int = 10800
    restart_lr: float = 5e-4
    warmup_steps: int = 200
    # This share of each batch draws its timestep from the noisiest (1 - high_noise_from/1000) of
    # the schedule, where the composition (count, size, place) is decided; the rest uniformly.
    high_noise_share: float = 0.3
    high_noise_from: int = 700
    # Latent pixels under an object weigh 1 + this much in the denoiser loss, fading linearly to
    # nothing at ``object_weight_until``. Objects cover ~5% of a scene: unweighted, the loss is almost
    # all background, and a CPU-sized run learns the background words long before the objects'
    # colours. But the weight also biases the optimum towards painting an object wherever one might
    # be (too many blobs), so the last part of the run is unweighted.
    object_loss_weight: float = 5.0
    object_weight_until: int = 6000
    # After the restart the weight is back, constant: with every count drawn in a fixed layout it no
    # longer adds blobs, and it is what teaches objects' colours and shapes quickly.
    restart_object_loss_weight: float = 3.0
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
            denoiser_steps=4, restart_step=2, warmup_steps=1, object_weight_until=3, checkpoint_minutes=0.0,
            export_minutes=1e9,
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


def _restore_stage(path: Path, key: str, module: torch.nn.Module, optimizer: torch.optim.Optimizer, total: int,
                   resume: bool) -> int | None:
    """Load an autoencoder stage's checkpoint into ``module`` and ``optimizer``.

    Returns the step to continue from (0 without a checkpoint), or None when the stage is finished.
    """
    if not path.exists():
        return 0
    state = torch.load(path, weights_only=False)
    module.load_state_dict(state[key])
    optimizer.load_state_dict(state["optimizer"])
    if state["step"] >= total:
        return None
    if not resume:
        raise SystemExit(f"{path} holds an unfinished {key} run: pass --resume")
    return int(state["step"])


def _run_stage(config: TrainConfig, label: str, start: int, total: int,
               train_step: Callable[[int], tuple[float, float]], save: Callable[[int], None]) -> None:
    """The loop both autoencoder stages share: ``train_step(step) -> (loss, l1)`` with progress, a
    smoothed loss and a checkpoint (``save(steps_done)``) every few minutes and at the end."""
    last_save = time.monotonic()
    smoothed: float | None = None
    log = _LogLines()
    with _progress() as progress:
        task = progress.add_task(label, total=total, completed=start, status="")
        for step in range(start, total):
            loss, l1 = train_step(step)
            smoothed = loss if smoothed is None else 0.95 * smoothed + 0.05 * loss
            status = f"loss {smoothed:.4f} (l1 {l1:.4f})"
            progress.update(task, advance=1, status=status)
            log.maybe(label, step + 1, total, status)
            if step + 1 == total or time.monotonic() - last_save > config.checkpoint_minutes * 60:
                save(step + 1)
                last_save = time.monotonic()


def _optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
    optimizer.step()


def train_vae(config: TrainConfig, paths: RunPaths, resume: bool) -> AutoencoderKL:
    torch.manual_seed(config.seed)
    vae = build_vae(config.model)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    start = _restore_stage(paths.vae, "vae", vae, optimizer, config.vae_steps, resume)
    if start is None:
        return vae.eval()
    console.print(f"VAE: {parameter_count(vae):,} parameters, factor {config.model.vae_scale_factor}")
    vae.train()

    def train_step(step: int) -> tuple[float, float]:
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
        _optimizer_step(optimizer, loss, config.vae_lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * cosine))
        return loss.item(), l1.item()

    def save(steps_done: int) -> None:
        _atomic_save({"vae": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": steps_done}, paths.vae)

    _run_stage(config, "vae", start, config.vae_steps, train_step, save)
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
    start = _restore_stage(paths.decoder, "decoder", decoder_modules, optimizer, config.decoder_steps, resume)
    if start is None:
        return vae.eval()
    vae.eval()
    decoder_modules.train()

    def train_step(step: int) -> tuple[float, float]:
        images = _vae_batch(config, step, config.decoder_batch, config.decoder_crop, stream=1)
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.mean
        noise = torch.randn(latents.shape, generator=_step_generator(config.seed, 2, step))
        recon = vae.decode(latents + 0.1 * latents.std() * noise).sample
        loss, l1 = _reconstruction_loss(recon, images)
        cosine = 0.5 * (1 + math.cos(math.pi * step / config.decoder_steps))
        _optimizer_step(optimizer, loss, config.decoder_lr * cosine)
        return loss.item(), l1.item()

    def save(steps_done: int) -> None:
        _atomic_save({"decoder": decoder_modules.state_dict(), "optimizer": optimizer.state_dict(),
                      "step": steps_done}, paths.decoder)

    _run_stage(config, "decoder", start, config.decoder_steps, train_step, save)
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


def build_dataset(config: TrainConfig, paths: RunPaths, vae: AutoencoderKL) -> dict[str, Any]:
    """Every bucket's scenes as latents (fp16), their captions and their objects' latent masks."""
    if paths.dataset.exists():
        dataset: dict[str, Any] = torch.load(paths.dataset, weights_only=False)
        encoded = [(b["bucket"]["width"], b["bucket"]["height"], b["bucket"]["scenes"]) for b in dataset["buckets"]]
        wanted = [(b.width, b.height, b.scenes) for b in config.buckets]
        if encoded != wanted:
            raise SystemExit(f"{paths.dataset} holds scenes {encoded} (width, height, count), the config asks for "
                             f"{wanted}: delete it to encode the config's")
        return dataset
    buckets: list[dict[str, Any]] = []
    total = sum(b.scenes for b in config.buckets)
    factor = config.model.vae_scale_factor
    chunk = 16
    next_seed = 0
    with _progress() as progress, torch.inference_mode():
        task = progress.add_task("encode scenes", total=total, status="")
        log = _LogLines()
        for bucket in config.buckets:
            latents, masks, captions = [], [], []
            for first in range(0, bucket.scenes, chunk):
                seeds = range(next_seed + first, next_seed + min(first + chunk, bucket.scenes))
                rendered = [render_scene(seed, bucket.width, bucket.height) for seed in seeds]
                pixels = torch.stack([_to_tensor(image) for image, _ in rendered])
                latents.append(vae.encode(pixels).latent_dist.mean.to(torch.float16))
                masks += [object_mask(scene, bucket.width, bucket.height, factor) for _, scene in rendered]
                captions += [scene.caption for _, scene in rendered]
                status = f"{bucket.width}x{bucket.height}"
                progress.update(task, advance=len(seeds), status=status)
                log.maybe("encode", first + len(seeds), bucket.scenes, status)
            next_seed += bucket.scenes
            buckets.append({"bucket": asdict(bucket), "latents": torch.cat(latents), "masks": torch.stack(masks),
                            "captions": captions})
    flat = torch.cat([b["latents"].float().flatten() for b in buckets])
    std, mean = flat.std().item(), flat.mean().item()
    console.print(f"latents: mean {mean:.3f}, std {std:.3f} -> scaling factor {1 / std:.4f}")
    dataset = {"buckets": buckets, "scaling_factor": 1.0 / std}
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
        self.ema_text_encoder.load_state_dict(state["ema_text_encoder"])
        added = self._load_unet(self.unet, state["unet"])
        self._load_unet(self.ema_unet, state["ema_unet"])
        if added:
            # The optimizer's state is indexed by parameter position, which the new module shifts:
            # restart its moments (the run restarts its learning rate there anyway).
            console.print(f"the checkpoint predates {', '.join(sorted(added))}: starting it from its initial "
                          "weights, with fresh optimizer moments")
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.seconds = state["step"], state.get("seconds", 0.0)

    @staticmethod
    def _load_unet(unet: UNet2DConditionModel, weights: dict[str, torch.Tensor]) -> set[str]:
        """Load ``weights``; returns the modules a checkpoint from before the caption embedding lacked."""
        result = unet.load_state_dict(weights, strict=False)
        if result.unexpected_keys or any(not key.startswith("add_embedding.") for key in result.missing_keys):
            raise RuntimeError(f"checkpoint does not fit the UNet: missing {result.missing_keys}, "
                               f"unexpected {result.unexpected_keys}")
        return {key.split(".")[0] for key in result.missing_keys}

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
    # Mix and batch sizes come from the config, the scenes from the dataset file (checked to match
    # the config's buckets when loaded): the mix can change without re-encoding.
    choice = int(torch.multinomial(torch.tensor([b.weight for b in config.buckets]), 1, generator=generator))
    bucket, size = dataset["buckets"][choice], config.buckets[choice].batch_size
    index = torch.randint(0, len(bucket["captions"]), (size,), generator=generator)
    latents = bucket["latents"][index].float() * dataset["scaling_factor"]
    if step >= config.restart_step:
        object_weight = config.restart_object_loss_weight
    else:
        object_weight = config.object_loss_weight * max(0.0, 1.0 - step / config.object_weight_until)
    weights = 1.0 + object_weight * bucket["masks"][index].float()[:, None]
    drop = torch.rand(size, generator=generator) < config.caption_dropout
    captions = ["" if dropped else bucket["captions"][i]
                for i, dropped in zip(index.tolist(), drop.tolist(), strict=True)]
    return latents, weights, captions


def _denoiser_lr(config: TrainConfig, step: int) -> float:
    """Linear warm-up, cosine decay, and the same again from ``restart_step`` (a warm restart)."""
    start, end, peak = 0, config.restart_step, config.denoiser_lr
    if step >= config.restart_step:
        start, end, peak = config.restart_step, config.denoiser_steps, config.restart_lr
    warmup = min(1.0, (step - start + 1) / config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, (step - start) / max(1, end - start))))
    return warmup * (config.denoiser_min_lr + (peak - config.denoiser_min_lr) * cosine)


def _timesteps(config: TrainConfig, count: int, total: int, generator: torch.Generator) -> torch.Tensor:
    uniform = torch.randint(0, total, (count,), generator=generator)
    noisy = torch.randint(config.high_noise_from, total, (count,), generator=generator)
    return torch.where(torch.rand(count, generator=generator) < config.high_noise_share, noisy, uniform)


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
            timesteps = _timesteps(config, latents.shape[0], len(alphas_cumprod), generator)
            alpha = alphas_cumprod[timesteps].sqrt().view(-1, 1, 1, 1)
            sigma = (1 - alphas_cumprod[timesteps]).sqrt().view(-1, 1, 1, 1)
            noisy = alpha * latents + sigma * noise
            target = alpha * noise - sigma * latents  # v-prediction
            hidden = state.text_encoder(_tokenize(tokenizer, captions)).last_hidden_state
            prediction = state.unet(noisy, timesteps, hidden).sample
            loss = (weights * (prediction - target).pow(2)).mean() / weights.mean()
            _optimizer_step(state.optimizer, loss, _denoiser_lr(config, state.step))
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
