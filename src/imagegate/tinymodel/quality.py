"""Does an image show what its prompt says? Pixel statistics only, no second model.

The measurements are deliberately simple and match how ``data.py`` draws scenes: the background
is what the image border shows, the foreground is every pixel far from it, blobs are connected
foreground regions, and colours are classified by the nearest named colour of the palette.

``python -m imagegate.tinymodel.quality --model <pipeline dir>`` prints the model card's table.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from imagegate.tinymodel.data import COLOURS

PALETTE_NAMES = list(COLOURS)
PALETTE = np.array([COLOURS[name] for name in PALETTE_NAMES], dtype=np.float32)

# Pixels this far (RGB distance) from the background colour are foreground.
FOREGROUND_DISTANCE = 70.0
# Blobs smaller than this share of the image are noise, not objects.
MIN_BLOB_SHARE = 0.002
ANALYSIS_SIZE = 128  # images are analysed at this size: cheap, and blob sizes are relative anyway


def _pixels(image: Image.Image) -> np.ndarray:
    small = image.convert("RGB").resize((ANALYSIS_SIZE, ANALYSIS_SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32)


def nearest_colour_names(pixels: np.ndarray) -> np.ndarray:
    """Palette index of every pixel (``pixels``: (..., 3) RGB)."""
    distances = np.linalg.norm(pixels[..., None, :] - PALETTE, axis=-1)
    return np.asarray(distances.argmin(axis=-1))


def colour_name(rgb: np.ndarray) -> str:
    return PALETTE_NAMES[int(nearest_colour_names(np.asarray(rgb, dtype=np.float32)[None])[0])]


def background_rgb(image: Image.Image, region: str = "border") -> np.ndarray:
    """Median colour of the border (or the "top"/"bottom" tenth of the image)."""
    pixels = _pixels(image)
    edge = ANALYSIS_SIZE // 16
    match region:
        case "top":
            sample = pixels[:edge].reshape(-1, 3)
        case "bottom":
            sample = pixels[-edge:].reshape(-1, 3)
        case _:
            sample = np.concatenate([pixels[:edge].reshape(-1, 3), pixels[-edge:].reshape(-1, 3),
                                     pixels[:, :edge].reshape(-1, 3), pixels[:, -edge:].reshape(-1, 3)])
    return np.asarray(np.median(sample, axis=0))


def foreground_mask(image: Image.Image) -> np.ndarray:
    pixels = _pixels(image)
    return np.asarray(np.linalg.norm(pixels - background_rgb(image), axis=-1) > FOREGROUND_DISTANCE)


def dominant_foreground_colour(image: Image.Image) -> str | None:
    """The palette colour most foreground pixels are nearest to; None when there is no foreground."""
    mask = foreground_mask(image)
    if mask.sum() < MIN_BLOB_SHARE * mask.size:
        return None
    names = nearest_colour_names(_pixels(image)[mask])
    return PALETTE_NAMES[Counter(names.tolist()).most_common(1)[0][0]]


def blobs(mask: np.ndarray) -> list[np.ndarray]:
    """Connected (4-neighbour) regions of ``mask`` above the noise size, as boolean masks."""
    height, width = mask.shape
    labels = np.zeros(mask.shape, dtype=np.int32)
    found: list[np.ndarray] = []
    current = 0
    for y, x in zip(*np.nonzero(mask), strict=True):
        if labels[y, x]:
            continue
        current += 1
        labels[y, x] = current
        queue = deque([(y, x)])
        while queue:
            cy, cx = queue.popleft()
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    queue.append((ny, nx))
        region = labels == current
        if region.sum() >= MIN_BLOB_SHARE * mask.size:
            found.append(region)
    return found


def count_blobs(image: Image.Image) -> int:
    return len(blobs(foreground_mask(image)))


def colour_share(image: Image.Image, colour: str) -> float:
    """Share of pixels that are recognisably ``colour`` (nearest palette entry and close to it)."""
    pixels = _pixels(image)
    index = PALETTE_NAMES.index(colour)
    close = np.linalg.norm(pixels - PALETTE[index], axis=-1) < 90
    return float(((nearest_colour_names(pixels) == index) & close).mean())


def shape_of(region: np.ndarray) -> str:
    """circle / square / triangle / other, from how the blob fills its bounding box."""
    ys, xs = np.nonzero(region)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = region.sum() / box
    middle = (ys.max() + ys.min()) / 2
    lower_heavy = (ys > middle).sum() > 1.4 * (ys < middle).sum()
    if fill >= 0.87:
        return "square"
    if 0.70 <= fill < 0.87:
        return "circle"
    if 0.38 <= fill < 0.65 and lower_heavy:
        return "triangle"
    return "other"


@dataclass(frozen=True)
class Expectation:
    """What an image for ``prompt`` must show; None fields are not checked."""

    prompt: str
    colour: str | None = None
    background: str | None = None
    count: int | None = None
    shape: str | None = None
    sky_and_grass: bool = False

    def checks(self, image: Image.Image) -> dict[str, bool]:
        results: dict[str, bool] = {}
        if self.background is not None:
            results["background"] = colour_name(background_rgb(image)) == self.background
        if self.colour is not None:
            results["colour"] = dominant_foreground_colour(image) == self.colour
        found = blobs(foreground_mask(image)) if self.count is not None or self.shape is not None else []
        if self.count is not None:
            results["count"] = len(found) == self.count
        if self.shape is not None:
            largest = max(found, key=lambda region: int(region.sum())) if found else None
            results["shape"] = largest is not None and shape_of(largest) == self.shape
        if self.sky_and_grass:
            results["sky"] = colour_name(background_rgb(image, "top")) == "blue"
            results["grass"] = colour_name(background_rgb(image, "bottom")) == "green"
            results["colour"] = colour_share(image, self.colour or "yellow") > 0.01
        return results

    def matches(self, image: Image.Image) -> bool:
        return matched(self.checks(image))


# Shape is measured and reported, but a match needs only colour, background and count (the
# issue's bar): telling a soft 256 px triangle from a diamond by pixel statistics is too fragile.
INFORMATIONAL_CHECKS = frozenset({"shape"})


def matched(checks: dict[str, bool]) -> bool:
    return all(ok for name, ok in checks.items() if name not in INFORMATIONAL_CHECKS)


# The fixed prompts of the quality test: colour, shape, count and background all covered.
EXPECTATIONS: tuple[Expectation, ...] = (
    Expectation("a red circle on a white background", colour="red", background="white", count=1, shape="circle"),
    Expectation("a blue square on a yellow background", colour="blue", background="yellow", count=1, shape="square"),
    Expectation("two green circles on a black background", colour="green", background="black", count=2),
    Expectation("three yellow stars on a blue background", colour="yellow", background="blue", count=3),
    Expectation("a large orange triangle on a gray background", colour="orange", background="gray", count=1,
                shape="triangle"),
    Expectation("two purple squares on a white background", colour="purple", background="white", count=2),
    Expectation("a white star on a red background", colour="white", background="red", count=1),
    Expectation("a pink heart on a green background", colour="pink", background="green", count=1),
    Expectation("a yellow circle in a sunny landscape", colour="yellow", sky_and_grass=True),
)
QUALITY_SEEDS: tuple[int, ...] = tuple(range(16))
# Negative prompt check: the prompt leaves every colour open (object and background), so the model
# paints some red on its own; the negative prompt names that colour.
NEGATIVE_CHECK = ("a circle", "red")

Renderer = Callable[[str, str | None, Sequence[int], float | None], list[Image.Image]]
"""(prompt, negative prompt, seeds, guidance or None for the default) -> one image per seed."""


@dataclass
class QualityReport:
    size: int
    steps: int | None
    guidance: float | None
    low_guidance: float
    rates: dict[str, float] = field(default_factory=dict)
    low_guidance_rates: dict[str, float] = field(default_factory=dict)
    check_rates: dict[str, dict[str, float]] = field(default_factory=dict)
    negative_share_without: float = 0.0
    negative_share_with: float = 0.0
    seconds: float = 0.0
    seed_count: int = 0

    @property
    def mean_rate(self) -> float:
        return float(np.mean(list(self.rates.values())))

    @property
    def mean_low_guidance_rate(self) -> float:
        return float(np.mean(list(self.low_guidance_rates.values())))

    def markdown(self) -> str:
        check_names = ["colour", "background", "count", "sky", "grass", "shape"]
        lines = [
            f"| prompt | match rate (guidance {self.guidance or 'default'}) | guidance {self.low_guidance} | "
            + " | ".join(f"{name} (info)" if name in INFORMATIONAL_CHECKS else name for name in check_names) + " |",
            "|---|---|---|" + "---|" * len(check_names),
        ]
        for prompt, rate in self.rates.items():
            checks = self.check_rates[prompt]
            cells = [f"{checks[name]:.0%}" if name in checks else "–" for name in check_names]
            lines.append(f"| {prompt} | **{rate:.0%}** | {self.low_guidance_rates.get(prompt, float('nan')):.0%} | "
                         + " | ".join(cells) + " |")
        lines.append(f"| **mean** | **{self.mean_rate:.0%}** | {self.mean_low_guidance_rate:.0%} |"
                     + " |" * len(check_names))
        prompt, negative = NEGATIVE_CHECK
        lines.append("")
        lines.append(f"{self.size}x{self.size} px, {self.steps or 'default'} steps, "
                     f"{self.seed_count} seeds per prompt. "
                     "A seed matches when every check but the informational ones passes.")
        lines.append("")
        lines.append(f"Negative prompt: \"{prompt}\" has {self.negative_share_without:.2%} {negative} pixels over "
                     f"{self.seed_count} seeds; with negativePrompt \"{negative}\" {self.negative_share_with:.2%}.")
        return "\n".join(lines)


def measure(render: Renderer, size: int, guidance: float | None, low_guidance: float = 1.0,
            steps: int | None = None, expectations: Sequence[Expectation] = EXPECTATIONS,
            seeds: Sequence[int] = QUALITY_SEEDS) -> QualityReport:
    started = time.monotonic()
    report = QualityReport(size=size, steps=steps, guidance=guidance, low_guidance=low_guidance,
                           seed_count=len(seeds))
    for expectation in expectations:
        images = render(expectation.prompt, None, seeds, guidance)
        per_image = [expectation.checks(image) for image in images]
        report.rates[expectation.prompt] = float(np.mean([matched(c) for c in per_image]))
        report.check_rates[expectation.prompt] = {
            name: float(np.mean([c[name] for c in per_image])) for name in per_image[0]
        }
        low = render(expectation.prompt, None, seeds, low_guidance)
        report.low_guidance_rates[expectation.prompt] = float(np.mean([expectation.matches(i) for i in low]))
    prompt, negative = NEGATIVE_CHECK
    without = render(prompt, None, seeds, guidance)
    report.negative_share_without = float(np.mean([colour_share(image, negative) for image in without]))
    with_negative = render(prompt, negative, seeds, guidance)
    report.negative_share_with = float(np.mean([colour_share(image, negative) for image in with_negative]))
    report.seconds = time.monotonic() - started
    return report


def pipeline_renderer(model_dir: Path, size: int, steps: int | None = None, default_guidance: float | None = None,
                      threads: int = 1) -> Renderer:
    """A renderer straight on ``diffusers`` (the test prefers the server's backend).

    ``default_guidance`` stands in for the catalog default when a call passes None.
    """
    import torch
    from diffusers import DiffusionPipeline

    torch.set_num_threads(threads)
    pipeline = DiffusionPipeline.from_pretrained(model_dir, dtype=torch.float32)  # type: ignore[no-untyped-call]
    pipeline.set_progress_bar_config(disable=True)

    def render(prompt: str, negative: str | None, seeds: Sequence[int], guidance: float | None) -> list[Image.Image]:
        kwargs: dict[str, float] = {} if steps is None else {"num_inference_steps": steps}
        scale = guidance if guidance is not None else default_guidance
        if scale is not None:
            kwargs["guidance_scale"] = scale
        # One batched call, one generator per seed: a CPU runs a batch far faster than its images one by one.
        result = pipeline(prompt, negative_prompt=negative, width=size, height=size, num_images_per_prompt=len(seeds),
                          generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds], **kwargs)
        return list(result.images)

    return render


def main() -> None:
    parser = argparse.ArgumentParser(description="Measure imagegate-tiny's prompt following.")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance", type=float, help="default: the catalog's")
    parser.add_argument("--save", type=Path, help="write a contact sheet of the first 8 seeds per prompt")
    args = parser.parse_args()
    from imagegate.catalog import build_catalog
    from imagegate.config import load_settings

    spec = build_catalog(load_settings())["imagegate-tiny"]
    steps = args.steps or spec.steps.default
    render = pipeline_renderer(args.model, args.size, steps, spec.guidance.default)
    if args.save is not None:
        rows = [render(e.prompt, None, QUALITY_SEEDS[:8], args.guidance) for e in EXPECTATIONS]
        thumb = 128
        sheet = Image.new("RGB", (thumb * 8, thumb * len(rows)))
        for r, images in enumerate(rows):
            for c, image in enumerate(images):
                sheet.paste(image.resize((thumb, thumb)), (c * thumb, r * thumb))
        sheet.save(args.save)
    report = measure(render, args.size, args.guidance, steps=steps)
    print(report.markdown())
    print(f"\n{report.seconds:.0f} s")


if __name__ == "__main__":
    main()
