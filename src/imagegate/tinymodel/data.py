"""Procedurally generated, captioned scenes: the whole training set of imagegate-tiny.

Every scene is drawn from a seeded ``random.Random``, so ``render_scene(seed, w, h)`` is a pure
function of its arguments. Captions are plain English over the closed vocabulary below
(documented in ``docs/tiny-model-vocabulary.md``); sizes and positions are relative to the
image, so the same caption means the same composition at every resolution and aspect ratio.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

# Named colours, as the renderer paints them (jittered a little per scene) and as the quality
# test classifies pixels.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "orange": (245, 140, 25),
    "yellow": (245, 215, 35),
    "green": (40, 165, 60),
    "blue": (35, 85, 220),
    "purple": (135, 55, 190),
    "pink": (245, 135, 190),
    "white": (245, 245, 245),
    "black": (22, 22, 22),
    "gray": (128, 128, 128),
}
COLOUR_SYNONYMS: dict[str, str] = {"grey": "gray"}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "heart")
PLURALS: dict[str, str] = {shape: shape + "s" for shape in SHAPES}

COUNT_WORDS: dict[int, tuple[str, ...]] = {1: ("a", "one"), 2: ("two",), 3: ("three",), 4: ("four",)}
COUNT_WEIGHTS: dict[int, float] = {1: 0.42, 2: 0.25, 3: 0.21, 4: 0.12}

# Diameter as a fraction of the image's shorter side.
SIZE_RANGES: dict[str, tuple[float, float]] = {
    "small": (0.10, 0.14),
    "medium": (0.17, 0.23),
    "large": (0.30, 0.38),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small",), "medium": ("",), "large": ("large", "big")}

# Where a lone object's centre goes, as (x range, y range) fractions of the image.
POSITIONS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "on the left": ((0.12, 0.30), (0.25, 0.75)),
    "on the right": ((0.70, 0.88), (0.25, 0.75)),
    "at the top": ((0.25, 0.75), (0.12, 0.30)),
    "at the bottom": ((0.25, 0.75), (0.70, 0.88)),
    "in the center": ((0.42, 0.58), (0.42, 0.58)),
}
# Where the objects of a caption without a position go: one fixed arrangement per count, as
# (x, y) fractions of the image, jittered by up to LAYOUT_JITTER. A model this small cannot learn
# to compose a scene out of pure noise when objects land anywhere: it paints blobs wherever the
# noise suggests and ignores the count. A fixed arrangement per count is a template it learns
# quickly, and one a viewer counts at a glance.
LAYOUTS: dict[int, tuple[tuple[float, float], ...]] = {
    1: ((0.5, 0.5),),
    2: ((0.28, 0.5), (0.72, 0.5)),
    3: ((0.5, 0.3), (0.27, 0.7), (0.73, 0.7)),
    4: ((0.3, 0.3), (0.7, 0.3), (0.3, 0.7), (0.7, 0.7)),
}
LAYOUT_JITTER = 0.05
# Two object groups: the first on an upper row, the second on a lower one.
GROUP_ROWS = (0.3, 0.7)
SCENES: dict[str, str] = {"landscape": "in a sunny landscape", "night": "in the night sky"}

# Colours of the two scenes' fixed parts.
SKY_TOP, SKY_BOTTOM, GRASS, SUN = (70, 140, 235), (170, 210, 250), (60, 160, 60), (250, 220, 60)
NIGHT_TOP, NIGHT_BOTTOM, MOON = (8, 12, 40), (30, 40, 90), (235, 235, 210)

SUPERSAMPLE = 2  # draw at 2x and downsample: anti-aliased edges like a real renderer


@dataclass(frozen=True)
class ObjectGroup:
    count: int
    shape: str
    colour: str
    size: str
    position: str | None  # a POSITIONS key, only for a lone object


@dataclass(frozen=True)
class Background:
    kind: str  # "plain", "gradient", "landscape" or "night"
    colours: tuple[str, ...] = ()


@dataclass
class Scene:
    caption: str
    groups: list[ObjectGroup]
    background: Background
    # Each drawn object: (shape, colour name, centre x, centre y, diameter) in pixels.
    objects: list[tuple[str, str, float, float, float]] = field(default_factory=list)


def vocabulary() -> list[str]:
    """Every word a caption can contain, in a stable order."""
    words: list[str] = []
    words += list(COLOURS) + list(COLOUR_SYNONYMS)
    words += list(SHAPES) + list(PLURALS.values())
    words += [w for ws in COUNT_WORDS.values() for w in ws] + ["an"]
    words += [w for ws in SIZE_WORDS.values() for w in ws if w]
    for phrase in [*POSITIONS, *SCENES.values(), "on a background", "on a gradient from to", "and"]:
        words += phrase.split()
    seen: dict[str, None] = {}
    for word in words:
        seen.setdefault(word, None)
    return list(seen)


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int = 12) -> tuple[int, int, int]:
    r, g, b = (min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)
    return (r, g, b)


def _colour_distance(a: str, b: str) -> float:
    return math.dist(COLOURS[a], COLOURS[b])


def _sample_group(rng: random.Random, forbidden: set[str], max_count: int, allow_position: bool) -> ObjectGroup:
    counts = [c for c in COUNT_WEIGHTS if c <= max_count]
    count = rng.choices(counts, weights=[COUNT_WEIGHTS[c] for c in counts])[0]
    colour = rng.choice([c for c in COLOURS if c not in forbidden])
    sizes = ["small", "medium", "large"] if count <= 2 else ["small", "medium"]
    size = rng.choice(sizes)
    position = rng.choice(list(POSITIONS)) if count == 1 and allow_position and rng.random() < 0.4 else None
    if position is not None and size == "large":
        size = "medium"
    return ObjectGroup(count, rng.choice(SHAPES), colour, size, position)


def _group_phrase(group: ObjectGroup, rng: random.Random, say_colour: bool) -> str:
    size_word = rng.choice(SIZE_WORDS[group.size])
    colour_word = group.colour if say_colour else ""
    if colour_word == "gray" and rng.random() < 0.3:
        colour_word = "grey"
    noun = group.shape if group.count == 1 else PLURALS[group.shape]
    body = " ".join(w for w in (size_word, colour_word, noun) if w)
    count_word = rng.choice(COUNT_WORDS[group.count])
    if count_word == "a":
        count_word = _article(body)
    phrase = f"{count_word} {body}"
    return f"{phrase} {group.position}" if group.position else phrase


def _background_phrase(background: Background) -> str:
    match background.kind:
        case "plain":
            return f"on {_article(background.colours[0])} {background.colours[0]} background"
        case "gradient":
            return f"on a gradient from {background.colours[0]} to {background.colours[1]}"
        case _:
            return SCENES[background.kind]


def sample_scene(rng: random.Random) -> Scene:
    """A random scene description (what to draw and its caption), nothing drawn yet."""
    roll = rng.random()
    if roll < 0.58:
        background = Background("plain", (rng.choice(list(COLOURS)),))
    elif roll < 0.78:
        top, bottom = rng.sample(list(COLOURS), 2)
        background = Background("gradient", (top, bottom))
    else:
        background = Background(rng.choice(list(SCENES)))
    # Objects must stand out from every background colour they could sit on.
    background_colours = {
        "plain": set(background.colours),
        "gradient": set(background.colours),
        "landscape": {"blue", "green"},
        "night": {"black", "blue"},
    }[background.kind]
    forbidden = {c for c in COLOURS if any(_colour_distance(c, b) < 110 for b in background_colours)}
    groups = [_sample_group(rng, forbidden, max_count=4, allow_position=True)]
    if rng.random() < 0.15 and groups[0].position is None:
        second = _sample_group(rng, forbidden | {groups[0].colour}, max_count=5 - groups[0].count, allow_position=False)
        if second.shape != groups[0].shape or second.colour != groups[0].colour:
            groups.append(second)
    say_colour = rng.random() > 0.08
    phrases = [_group_phrase(g, rng, say_colour) for g in groups]
    caption = " and ".join(phrases)
    if rng.random() > 0.08:
        caption += " " + _background_phrase(background)
    return Scene(caption=caption, groups=groups, background=background)


def _paint_background(draw: ImageDraw.ImageDraw, background: Background, w: int, h: int, rng: random.Random,
                      obstacles: list[tuple[float, float, float]]) -> None:
    def vertical_gradient(top: tuple[int, int, int], bottom: tuple[int, int, int], y0: int, y1: int) -> None:
        for y in range(y0, y1):
            t = (y - y0) / max(1, y1 - y0 - 1)
            draw.line([(0, y), (w, y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom, strict=True)))

    short = min(w, h)
    match background.kind:
        case "plain":
            draw.rectangle([0, 0, w, h], fill=_jitter(COLOURS[background.colours[0]], rng))
        case "gradient":
            top = _jitter(COLOURS[background.colours[0]], rng)
            bottom = _jitter(COLOURS[background.colours[1]], rng)
            vertical_gradient(top, bottom, 0, h)
        case "landscape":
            horizon = round(h * rng.uniform(0.68, 0.78))
            vertical_gradient(SKY_TOP, SKY_BOTTOM, 0, horizon)
            draw.rectangle([0, horizon, w, h], fill=_jitter(GRASS, rng, 8))
            r = short * rng.uniform(0.07, 0.10)
            cx = w * rng.choice([rng.uniform(0.1, 0.22), rng.uniform(0.78, 0.9)])
            cy = h * rng.uniform(0.1, 0.2)
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=SUN)
            obstacles.append((cx, cy, r))
        case "night":
            vertical_gradient(NIGHT_TOP, NIGHT_BOTTOM, 0, h)
            for _ in range(rng.randint(15, 30)):
                x, y, r = rng.uniform(0, w), rng.uniform(0, h), short * 0.004 * rng.uniform(0.7, 1.3)
                draw.ellipse([x - r, y - r, x + r, y + r], fill=(220, 220, 230))
            r = short * rng.uniform(0.06, 0.08)
            cx, cy = w * rng.uniform(0.1, 0.9), h * rng.uniform(0.08, 0.18)
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=MOON)
            obstacles.append((cx, cy, r))


def shape_polygon(shape: str, cx: float, cy: float, d: float) -> list[tuple[float, float]] | None:
    """Outline of ``shape`` with bounding size ``d`` centred at (cx, cy); None for a circle."""
    r = d / 2
    match shape:
        case "circle":
            return None
        case "square":
            s = r * 0.88  # same visual weight as the circle
            return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
        case "triangle":
            return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
        case "diamond":
            return [(cx, cy - r), (cx + r * 0.72, cy), (cx, cy + r), (cx - r * 0.72, cy)]
        case "star":
            points = []
            for i in range(10):
                radius = r if i % 2 == 0 else r * 0.45
                angle = -math.pi / 2 + i * math.pi / 5
                points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle) + r * 0.1))
            return points
        case "heart":
            points = []
            for i in range(48):
                t = 2 * math.pi * i / 48
                x = 16 * math.sin(t) ** 3
                y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
                points.append((cx + x * r / 16.5, cy - y * r / 16.5 - r * 0.05))
            return points
    raise ValueError(f"unknown shape {shape!r}")


def layout_slots(groups: list[ObjectGroup]) -> list[list[tuple[float, float]]]:
    """Each group's object centres as (x, y) fractions of the image, before jitter."""
    if len(groups) == 1:
        return [list(LAYOUTS[groups[0].count])]
    return [[((i + 1) / (group.count + 1), row) for i in range(group.count)]
            for group, row in zip(groups, GROUP_ROWS, strict=False)]


def _place(group: ObjectGroup, slots: list[tuple[float, float]], w: int, h: int, rng: random.Random,
           obstacles: list[tuple[float, float, float]]) -> list[tuple[float, float, float]]:
    """Non-overlapping (cx, cy, diameter) for the group's objects, so counts stay countable.

    Each object goes to its slot (or its named position), jittered; where the sun, the moon or a
    neighbour is in the way after many tries, anywhere free.
    """
    short = min(w, h)
    placed: list[tuple[float, float, float]] = []
    for slot in slots:
        for attempt in range(200):
            d = short * rng.uniform(*SIZE_RANGES[group.size]) * (0.85 if attempt > 100 else 1.0)
            if group.position is not None:
                (x0, x1), (y0, y1) = POSITIONS[group.position]
                cx, cy = w * rng.uniform(x0, x1), h * rng.uniform(y0, y1)
            elif attempt < 150:
                jitter = LAYOUT_JITTER * min(1.0, 0.5 + attempt / 50)
                cx = w * (slot[0] + rng.uniform(-jitter, jitter))
                cy = h * (slot[1] + rng.uniform(-jitter, jitter))
            else:
                margin = d / 2 + short * 0.03
                cx, cy = rng.uniform(margin, w - margin), rng.uniform(margin, h - margin)
            gap = short * 0.04
            inside = d / 2 <= cx <= w - d / 2 and d / 2 <= cy <= h - d / 2
            if inside and all(math.dist((cx, cy), (ox, oy)) > d / 2 + orad + gap for ox, oy, orad in obstacles):
                placed.append((cx, cy, d))
                obstacles.append((cx, cy, d / 2))
                break
    return placed


def draw_scene(scene: Scene, width: int, height: int, rng: random.Random) -> Image.Image:
    """Render ``scene`` at ``width`` x ``height``; fills ``scene.objects`` with what was drawn."""
    ss_w, ss_h = width * SUPERSAMPLE, height * SUPERSAMPLE
    canvas = Image.new("RGB", (ss_w, ss_h))
    draw = ImageDraw.Draw(canvas)
    obstacles: list[tuple[float, float, float]] = []
    _paint_background(draw, scene.background, ss_w, ss_h, rng, obstacles)
    scene.objects = []
    for group, slots in zip(scene.groups, layout_slots(scene.groups), strict=True):
        colour = _jitter(COLOURS[group.colour], rng, 10)
        for cx, cy, d in _place(group, slots, ss_w, ss_h, rng, obstacles):
            polygon = shape_polygon(group.shape, cx, cy, d)
            if polygon is None:
                draw.ellipse([cx - d / 2, cy - d / 2, cx + d / 2, cy + d / 2], fill=colour)
            else:
                draw.polygon(polygon, fill=colour)
            scene.objects.append((group.shape, group.colour, cx / SUPERSAMPLE, cy / SUPERSAMPLE, d / SUPERSAMPLE))
    return canvas.resize((width, height), Image.Resampling.BOX)


def render_scene(seed: int, width: int, height: int) -> tuple[Image.Image, Scene]:
    """The scene number ``seed``, rendered at the given size: deterministic."""
    rng = random.Random(seed)
    scene = sample_scene(rng)
    return draw_scene(scene, width, height, rng), scene
