"""The diffusers components of imagegate-tiny, built from scratch (nothing pretrained exists offline).

A standard latent-diffusion ``StableDiffusionPipeline``: a CLIP tokenizer whose BPE merges spell
every vocabulary word as one token, a tiny ``CLIPTextModel``, an ``AutoencoderKL`` with a
downsampling factor of 16 (so 512 px is a 32x32 latent), a ``UNet2DConditionModel`` with
attention only on its low-resolution levels, and a DPM-Solver++ scheduler.
"""

from __future__ import annotations

import itertools
import json
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

# Submodule imports: the top-level ``diffusers`` names resolve to dummy classes for type checkers.
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from imagegate.tinymodel.data import vocabulary

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"


@dataclass(frozen=True)
class TinyConfig:
    """Sizes of every component; ``smoke()`` is the seconds-long CI variant."""

    max_tokens: int = 32
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    # 5 levels -> factor 16; thin full-resolution levels keep the 512 px decode cheap on a CPU.
    vae_channels: tuple[int, ...] = (8, 16, 32, 64, 64)
    latent_channels: int = 8
    unet_channels: tuple[int, ...] = (64, 128, 128)
    unet_attention_head_dim: int = 32
    unet_layers_per_block: int = 1

    @property
    def vae_scale_factor(self) -> int:
        return int(2 ** (len(self.vae_channels) - 1))

    @classmethod
    def smoke(cls) -> TinyConfig:
        return cls(max_tokens=16, text_width=32, text_layers=1, text_heads=2, vae_channels=(8, 16, 16),
                   latent_channels=4, unet_channels=(16, 32), unet_attention_head_dim=8)


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character table (the tokenizer's base alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Plain BPE training on the vocabulary until every word is a single symbol."""
    spelled = {word: [*word[:-1], word[-1] + END_OF_WORD] for word in words}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols in spelled.values():
            pairs.update(itertools.pairwise(symbols))
        if not pairs:
            return merges
        # Most frequent pair first; ties broken alphabetically so the result is deterministic.
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        for word, symbols in spelled.items():
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            spelled[word] = merged


def build_tokenizer(max_tokens: int) -> CLIPTokenizer:
    """A CLIP tokenizer over the documented vocabulary; unknown words fall back to characters."""
    alphabet = list(_bytes_to_unicode().values())
    merges = _learn_merges(vocabulary())
    tokens = alphabet + [c + END_OF_WORD for c in alphabet] + ["".join(pair) for pair in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp, "vocab.json"), Path(tmp, "merges.txt")
        vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8")
        tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=max_tokens,
                                  pad_token=EOS, bos_token=BOS, eos_token=EOS, unk_token=EOS)
    return tokenizer


def build_text_encoder(config: TinyConfig, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=config.text_width, intermediate_size=config.text_width * 2,
        num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads,
        max_position_embeddings=config.max_tokens, projection_dim=config.text_width,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        attention_dropout=0.0,
    ))


def build_vae(config: TinyConfig) -> AutoencoderKL:
    levels = len(config.vae_channels)
    vae: AutoencoderKL = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=config.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        # Two groups: with one channel per group (8 groups on the 8-channel full-resolution level) the
        # last norm erases a flat background's colour, and the decoder cannot paint it back.
        block_out_channels=config.vae_channels, layers_per_block=1, norm_num_groups=2,
        sample_size=256,
        # Flat-coloured shapes need no global attention; convolutions only keep 2048 px affordable.
        mid_block_add_attention=False,
        scaling_factor=1.0,  # replaced by 1/std of real latents after the VAE is trained
    )
    return vae


def build_unet(config: TinyConfig) -> UNet2DConditionModel:
    levels = len(config.unet_channels)
    # No attention on the top level: CPU attention over 256+ tokens costs ~8x the rest of a training
    # step. The lower levels (8x8 and 4x4 latents at 256 px) attend to the caption and to each other,
    # which is where counts and positions get decided.
    unet: UNet2DConditionModel = UNet2DConditionModel(
        sample_size=16,
        in_channels=config.latent_channels, out_channels=config.latent_channels,
        block_out_channels=config.unet_channels, layers_per_block=config.unet_layers_per_block,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=config.text_width,
        attention_head_dim=config.unet_attention_head_dim,
        norm_num_groups=16 if min(config.unet_channels) % 16 == 0 and min(config.unet_channels) > 16 else 8,
        use_linear_projection=True,
        # The caption, pooled, is also added to the timestep embedding, which every ResNet block sees:
        # the full-resolution level, where a 3-latent-pixel object's shape is drawn, has no attention.
        addition_embed_type="text", addition_embed_type_num_heads=config.text_heads,
    )
    # Zero gain on the pooled caption's last norm: the embedding starts as a no-op, so adding it to
    # a trained UNet (a checkpoint from before it existed) leaves that UNet's output unchanged.
    torch.nn.init.zeros_(unet.add_embedding.norm2.weight)
    return unet


def build_scheduler() -> DPMSolverMultistepScheduler:
    # v-prediction on a zero-terminal-SNR schedule: flat black/white backgrounds need the model to
    # set the image's mean, which epsilon-prediction on the classic schedule cannot.
    scheduler: DPMSolverMultistepScheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
        algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero",
        steps_offset=1,  # unused by "trailing" spacing; set so diffusers does not warn about old configs
    )
    return scheduler


def assemble_pipeline(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, vae: AutoencoderKL,
                      unet: UNet2DConditionModel) -> StableDiffusionPipeline:
    pipeline: StableDiffusionPipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=build_scheduler(),  # type: ignore[arg-type]
        safety_checker=None, feature_extractor=None, image_encoder=None,  # type: ignore[arg-type]
        requires_safety_checker=False,
    )
    return pipeline


def parameter_count(module: object) -> int:
    return sum(p.numel() for p in module.parameters())  # type: ignore[attr-defined]
