"""Tiny random-weight FLUX / SD / SDXL pipelines, built fully offline.

They have the real pipeline classes and file layout (``save_pretrained``), so everything that
loads a diffusers directory works on them, yet they weigh about a megabyte and render 512 px in
well under a second on a CPU. Tests use them, and so does the README's demo until a trained model
ships. The images are noise-like: the weights are random.

Tokenizers are written on the fly (no hub): a byte-level BPE vocabulary for the CLIP side and a
small Unigram model for the T5 side.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path
from typing import Literal

import torch

# Submodule imports: the top-level ``diffusers`` names resolve to dummy classes for type checkers.
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

TinyPipelineKind = Literal["flux", "flux-dev", "sd", "sdxl"]
TINY_PIPELINE_KINDS: tuple[TinyPipelineKind, ...] = ("flux", "flux-dev", "sd", "sdxl")

# Width of every text embedding; FLUX needs T5 d_model == joint_attention_dim and
# CLIP hidden_size == pooled_projection_dim, so one number keeps the shapes consistent.
TEXT_DIM = 32
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512
# Four VAE blocks give the real models' 8x spatial compression: with fewer, 512 px would mean
# tens of thousands of latent tokens and seconds per image.
VAE_BLOCK_CHANNELS = (8, 8, 16, 16)
LATENT_CHANNELS = 4
# Three UNet levels with attention only at the lowest (256 tokens at 512 px): CPU attention over
# every latent pixel would take most of the time.
UNET_BLOCK_CHANNELS = (8, 16, 16)
UNET_DOWN_BLOCKS = ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D")
UNET_UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D")
# UNet2DConditionModel's ``attention_head_dim`` is, for historical reasons, the number of heads.
UNET_ATTENTION_HEADS = 2

_CLIP_WORDS = ("a", "an", "the", "of", "in", "on", "red", "blue", "green", "cat", "dog", "photo", "painting")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (byte-level BPE's alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Every byte alone and word-final, plus merges for a handful of words so they become one token."""
    alphabet = list(_bytes_to_unicode().values())
    tokens: list[str] = [*alphabet, *(char + "</w>" for char in alphabet)]
    merges: list[tuple[str, str]] = []
    for word in _CLIP_WORDS:
        # Merge left to right: ("c", "a"), ("ca", "t</w>") -> "cat</w>".
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            merge = (pieces[0], pieces[1])
            if merge not in merges:
                merges.append(merge)
            if merged not in tokens:
                tokens.append(merged)
            pieces = [merged, *pieces[2:]]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def _clip_tokenizer() -> CLIPTokenizer:
    vocab, merges = _clip_vocab_and_merges()
    # Through files, the loading path every transformers version shares (in-memory merges changed type in v5).
    with tempfile.TemporaryDirectory() as scratch:
        vocab_file, merges_file = Path(scratch, "vocab.json"), Path(scratch, "merges.txt")
        vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
        merges_file.write_text(
            "#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n", encoding="utf-8"
        )
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=CLIP_MAX_LENGTH)


def _t5_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-style Unigram tokenizer: letters and digits cover any prompt, words score better."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [(f"▁{word}", -2.0) for word in _CLIP_WORDS]
    pieces += [(char, -5.0) for char in string.ascii_lowercase + string.digits + string.punctuation]
    pieces += [(f"▁{char}", -5.5) for char in string.ascii_lowercase + string.digits]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=T5_MAX_LENGTH,
    )


def _clip_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=2 * TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=TEXT_DIM,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _tiny_vae(*, flux: bool) -> AutoencoderKL:
    vae: AutoencoderKL = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=LATENT_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_BLOCK_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_BLOCK_CHANNELS),
        block_out_channels=VAE_BLOCK_CHANNELS,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=128,
        # Self-attention over every latent pixel (4096 tokens at 512 px) would double decode time.
        mid_block_add_attention=False,
        # FLUX's VAE has no quant convs and reads shift_factor; SD's has both convs and no shift.
        use_quant_conv=not flux,
        use_post_quant_conv=not flux,
        shift_factor=0.0 if flux else None,
        scaling_factor=1.0,
    )
    return vae


def _save(pipeline: DiffusionPipeline, directory: Path) -> Path:
    # Freshly built modules are in train mode; T5's dropout would make equal seeds differ for anyone
    # using the in-memory pipeline (from_pretrained switches to eval mode by itself).
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    directory.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(directory)
    return directory


def build_tiny_flux(directory: str | Path, seed: int = 0, *, guidance_embeds: bool = False) -> Path:
    """A FLUX pipeline: schnell-like (no guidance input) or, with ``guidance_embeds``, dev-like."""
    torch.manual_seed(seed)
    tokenizer = _clip_tokenizer()
    tokenizer_2 = _t5_tokenizer()
    text_encoder = CLIPTextModel(_clip_config(tokenizer))
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=TEXT_DIM,
            d_kv=8,
            d_ff=2 * TEXT_DIM,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
        )
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        # The pipeline packs 2x2 latent patches into the channel axis.
        in_channels=4 * LATENT_CHANNELS,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        guidance_embeds=guidance_embeds,
        # Must sum to attention_head_dim.
        axes_dims_rope=(4, 6, 6),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    vae = _tiny_vae(flux=True)
    pipeline = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    return _save(pipeline, Path(directory))


def _sd_scheduler() -> EulerDiscreteScheduler:
    # SD's training schedule; "trailing" spacing keeps 1-4 step (turbo-style) sampling meaningful.
    scheduler: EulerDiscreteScheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="trailing",
        steps_offset=1,
    )
    return scheduler


def build_tiny_sd(directory: str | Path, seed: int = 0) -> Path:
    """A Stable Diffusion 1.x/2.x-style pipeline (one CLIP text encoder, classic CFG)."""
    torch.manual_seed(seed)
    tokenizer = _clip_tokenizer()
    text_encoder = CLIPTextModel(_clip_config(tokenizer))
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=UNET_BLOCK_CHANNELS,
        layers_per_block=1,
        down_block_types=UNET_DOWN_BLOCKS,
        up_block_types=UNET_UP_BLOCKS,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=UNET_ATTENTION_HEADS,
        norm_num_groups=4,
    )
    vae = _tiny_vae(flux=False)
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_sd_scheduler(),  # type: ignore[arg-type]  # annotated as the enum of scheduler names
        # Annotated as required, but None is how diffusers leaves these optional components out.
        safety_checker=None,  # type: ignore[arg-type]
        feature_extractor=None,  # type: ignore[arg-type]
        image_encoder=None,  # type: ignore[arg-type]
        requires_safety_checker=False,
    )
    return _save(pipeline, Path(directory))


def build_tiny_sdxl(directory: str | Path, seed: int = 0) -> Path:
    """An SDXL-style pipeline: two CLIP encoders (the second projected) and size/crop conditioning."""
    torch.manual_seed(seed)
    tokenizer = _clip_tokenizer()
    text_encoder = CLIPTextModel(_clip_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer))
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=UNET_BLOCK_CHANNELS,
        layers_per_block=1,
        down_block_types=UNET_DOWN_BLOCKS,
        up_block_types=UNET_UP_BLOCKS,
        # Both encoders' hidden states are concatenated.
        cross_attention_dim=2 * TEXT_DIM,
        attention_head_dim=UNET_ATTENTION_HEADS,
        norm_num_groups=4,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # Pooled projection + six size/crop numbers, each embedded to time_embed_dim.
        projection_class_embeddings_input_dim=TEXT_DIM + 6 * time_embed_dim,
    )
    vae = _tiny_vae(flux=False)
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=_sd_scheduler(),  # type: ignore[arg-type]  # annotated as the enum of scheduler names
        force_zeros_for_empty_prompt=True,
    )
    return _save(pipeline, Path(directory))


def build_tiny_pipeline(kind: TinyPipelineKind, directory: str | Path, seed: int = 0) -> Path:
    """Build the ``kind`` pipeline into ``directory`` and return it; ``flux-dev`` has a guidance input."""
    match kind:
        case "flux":
            return build_tiny_flux(directory, seed)
        case "flux-dev":
            return build_tiny_flux(directory, seed, guidance_embeds=True)
        case "sd":
            return build_tiny_sd(directory, seed)
        case "sdxl":
            return build_tiny_sdxl(directory, seed)
    raise ValueError(f"unknown tiny pipeline kind {kind!r}; expected one of {', '.join(TINY_PIPELINE_KINDS)}")
