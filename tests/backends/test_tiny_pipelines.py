"""The tiny offline pipelines: real diffusers directories that load and render fast."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from transformers import AutoTokenizer

from imagegate.tiny_pipelines import build_tiny_flux, build_tiny_pipeline

EXPECTED_CLASSES = {
    "flux": "FluxPipeline",
    "flux-dev": "FluxPipeline",
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
}


def weight_digests(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*.safetensors"))
    }


@pytest.mark.parametrize("kind", sorted(EXPECTED_CLASSES))
def test_loads_offline_and_renders(tiny_dirs: dict[str, Path], kind: str) -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    directory = tiny_dirs[kind]
    size_on_disk = sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())
    assert size_on_disk < 3 * 1024**2
    pipeline: Any = DiffusionPipeline.from_pretrained(directory)
    pipeline.set_progress_bar_config(disable=True)
    assert type(pipeline).__name__ == EXPECTED_CLASSES[kind]
    output = pipeline(
        prompt="a red cat",
        width=256,
        height=128,
        num_inference_steps=2,
        num_images_per_prompt=2,
        generator=[torch.Generator("cpu").manual_seed(seed) for seed in (1, 2)],
    )
    assert [image.size for image in output.images] == [(256, 128), (256, 128)]
    assert output.images[0].tobytes() != output.images[1].tobytes()


def test_flux_dev_has_a_guidance_input_and_schnell_none(tiny_dirs: dict[str, Path]) -> None:
    def guidance_embeds(kind: str) -> bool:
        config = json.loads((tiny_dirs[kind] / "transformer" / "config.json").read_text())
        return bool(config["guidance_embeds"])

    assert guidance_embeds("flux-dev") and not guidance_embeds("flux")


def test_build_is_deterministic_from_the_seed(tmp_path: Path) -> None:
    first = weight_digests(build_tiny_flux(tmp_path / "a", seed=3))
    again = weight_digests(build_tiny_pipeline("flux", tmp_path / "b", seed=3))
    other = weight_digests(build_tiny_flux(tmp_path / "c", seed=4))
    assert first == again
    assert first.keys() == other.keys() and first != other


def test_tokenizers_work_offline(tiny_dirs: dict[str, Path]) -> None:
    clip = AutoTokenizer.from_pretrained(tiny_dirs["flux"] / "tokenizer")
    t5 = AutoTokenizer.from_pretrained(tiny_dirs["flux"] / "tokenizer_2")
    # Vocabulary words are single BPE tokens between the start and end tokens.
    assert clip.convert_ids_to_tokens(clip("a red cat").input_ids) == [
        "<|startoftext|>",
        "a</w>",
        "red</w>",
        "cat</w>",
        "<|endoftext|>",
    ]
    # Unknown words still spell out, letter by letter, and the sequence ends with </s>.
    t5_tokens = t5.convert_ids_to_tokens(t5("A zebra").input_ids)
    assert t5_tokens[0] == "▁a" and t5_tokens[-1] == "</s>" and "<unk>" not in t5_tokens


def test_unknown_kind_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown tiny pipeline kind"):
        build_tiny_pipeline("imagen", tmp_path)  # type: ignore[arg-type]
