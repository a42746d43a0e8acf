"""Synthetic pictures of one to three coloured shapes, and questions about them with one right
answer each. Deterministic: the same seed draws the same pictures and questions, on any machine
(numpy's PCG64 and Pillow's rasteriser, no floating-point-sensitive geometry)."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Bump when anything below changes what a seed draws: the training run records it, and a
# checkpoint is only comparable with evaluations of the same version.
GENERATOR_VERSION = "shapes-v3"

COLOURS = {
    "red": (215, 38, 45),
    "green": (34, 160, 70),
    "blue": (40, 85, 215),
    "yellow": (240, 200, 25),
    "purple": (135, 60, 175),
    "orange": (245, 130, 25),
}
SHAPES = ("circle", "square", "triangle", "star")
NUMBERS = {1: "one", 2: "two", 3: "three"}
# Every shape sits inside one cell of the 28-pixel grid on which the vision tower merges its
# 14-pixel patches 2 x 2, so each shape is one visual token for the language model and colour and
# shape are bound in the same token. With shapes of 40-58 pixels across token boundaries, a
# from-scratch tower trained for 20 minutes on 2 cores did not learn to bind them: "What shape is
# the red one?" stayed at chance on two- and three-shape pictures (shapes-v2, tools/train_shapes.py).
CELL = 28
# Canvases are whole cells (so the processor keeps every pixel), square and not.
CANVASES = ((112, 112), (140, 140), (168, 168), (140, 112), (112, 140), (168, 140), (140, 168), (168, 112), (112, 168))
SIZE_RANGE = (20, 26)  # shape bounding box side in pixels; the rest of the cell is canvas
BACKGROUND = (220, 238)  # grey level of the canvas's centre: light, and room for the shading below 255
NOISE, SHADE_X, SHADE_Y = 6, 8, 6  # grey levels: pixel noise, left-right brightness, top-bottom warmth
MIN_SEPARATION = 14  # an extreme ("topmost") shape is at least this far ahead of the next one

QUESTION_TYPES = ("colour", "shape", "count", "position", "caption")
CAPTION_QUESTIONS = ("Describe the image.", "What is in this picture?", "What do you see?")


@dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES
    colour: str  # one of COLOURS
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    size: tuple[int, int]  # width, height
    background: int  # grey level of the canvas
    texture_seed: int
    shapes: tuple[Shape, ...]

    def render(self) -> Image.Image:
        w, h = self.size
        rng = np.random.default_rng(self.texture_seed)
        # A lightly textured canvas: faint noise, so the model cannot key on exact colours, and a
        # faint light: brighter to the right, warmer at the top. The tiny vision tower has no
        # absolute positions (only relative rotary ones), and this shading is what lets it tell
        # left from right in the time it trains (see tools/train_shapes.py).
        noise = rng.integers(-NOISE, NOISE + 1, size=(h, w, 1), dtype=np.int16)
        x = np.linspace(-SHADE_X, SHADE_X, w).round().astype(np.int16)[None, :, None]
        y = np.linspace(SHADE_Y, -SHADE_Y, h).round().astype(np.int16)[:, None, None]
        canvas = self.background + noise + x + y * np.array([1, 0, -1], dtype=np.int16)
        img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(img)
        for s in self.shapes:
            _draw(draw, s)
        return img

    def png(self) -> bytes:
        buf = io.BytesIO()
        self.render().save(buf, format="PNG")
        return buf.getvalue()

    def cell(self, shape: Shape) -> int:
        """The CELL-pixel cell that holds `shape`, counted row by row: the processor's order of
        the merged visual tokens."""
        return (shape.box[1] // CELL) * (self.size[0] // CELL) + shape.box[0] // CELL

    def caption(self) -> str:
        names = [_article(s.name) for s in sorted(self.shapes, key=lambda s: s.centre[0])]
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def demo_scene() -> Scene:
    """The picture `vlmesh demo` asks about (services/assets/demo.png is its rendering): drawn by
    hand inside the training distribution, so its caption is known."""
    shapes = (
        Shape("triangle", "red", (2, 86, 26, 110)),
        Shape("circle", "blue", (58, 30, 82, 54)),
        Shape("star", "yellow", (114, 85, 140, 111)),
    )
    return Scene((168, 140), 232, 20261123, shapes)


def _article(name: str) -> str:
    return ("an " if name[0] in "aeiou" else "a ") + name


def _draw(draw: ImageDraw.ImageDraw, s: Shape) -> None:
    x0, y0, x1, y1 = s.box
    fill = COLOURS[s.colour]
    if s.kind == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif s.kind == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif s.kind == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    else:  # star: five points, inner radius 0.45 of the outer; integer vertices for determinism
        cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((round(cx + rad * math.cos(a)), round(cy + rad * math.sin(a))))
        draw.polygon(pts, fill=fill)


def draw_scene(rng: np.random.Generator, num_shapes: int | None = None) -> Scene:
    """One picture: distinct colours, kinds and grid columns, so every question has one answer
    (left to right is never a tie; top and bottom are asked only across rows)."""
    w, h = CANVASES[rng.integers(len(CANVASES))]
    n = int(num_shapes or rng.integers(1, 4))
    kinds = rng.permutation(len(SHAPES))[:n]
    colours = rng.permutation(len(COLOURS))[:n]
    columns = rng.permutation(w // CELL)[:n]
    names = list(COLOURS)
    shapes = []
    for k, c, col in zip(kinds, colours, columns):
        row = int(rng.integers(h // CELL))
        side = int(rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1))
        x = int(col) * CELL + int(rng.integers(CELL - side + 1))
        y = row * CELL + int(rng.integers(CELL - side + 1))
        shapes.append(Shape(SHAPES[k], names[c], (x, y, x + side, y + side)))
    return Scene((w, h), int(rng.integers(BACKGROUND[0], BACKGROUND[1] + 1)), int(rng.integers(2**31)), tuple(shapes))


def _extreme(scene: Scene, side: str) -> Shape | None:
    """The shape furthest to `side`, if it is clearly so (else the question is ambiguous)."""
    if len(scene.shapes) < 2:
        return None
    axis, sign = {"left": (0, 1), "right": (0, -1), "top": (1, 1), "bottom": (1, -1)}[side]
    ordered = sorted(scene.shapes, key=lambda s: sign * s.centre[axis])
    if sign * (ordered[1].centre[axis] - ordered[0].centre[axis]) < MIN_SEPARATION:
        return None
    return ordered[0]


def ask(scene: Scene, qtype: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """(question, answer) of the given type about the scene, or None when it has no clear answer."""
    if qtype == "colour":
        return _colour_of(scene.shapes[rng.integers(len(scene.shapes))])
    if qtype == "shape":
        return _shape_of(scene.shapes[rng.integers(len(scene.shapes))])
    if qtype == "count":
        return _count(scene)
    if qtype == "position":
        extremes = list(_extremes(scene).items())
        return _position(*extremes[rng.integers(len(extremes))]) if extremes else None
    if qtype == "caption":
        return _caption(scene, rng)
    raise ValueError(f"unknown question type {qtype!r}")


# One phrasing per question type, shared by the held-out set (ask) and training (questions).
SIDES = ("left", "right", "top", "bottom")


def _colour_of(s: Shape) -> tuple[str, str]:
    return f"What colour is the {s.kind}?", s.colour


def _shape_of(s: Shape) -> tuple[str, str]:
    return f"What shape is the {s.colour} one?", s.kind


def _count(scene: Scene) -> tuple[str, str]:
    return "How many shapes are there?", NUMBERS[len(scene.shapes)]


def _extremes(scene: Scene) -> dict[str, Shape]:
    """Each side (in SIDES order) that has a clear extreme shape, and that shape."""
    return {side: s for side in SIDES if (s := _extreme(scene, side)) is not None}


def _position(side: str, s: Shape) -> tuple[str, str]:
    where = f"on the {side}" if side in ("left", "right") else f"at the {side}"
    return f"Which shape is {where}?", f"the {s.name}"


def _caption(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    return CAPTION_QUESTIONS[rng.integers(len(CAPTION_QUESTIONS))], scene.caption()


@dataclass(frozen=True)
class Example:
    scene: Scene
    question: str
    answer: str
    qtype: str


# Training and evaluation draw from different streams of numpy's seed sequence, so no held-out
# picture is ever a training picture, whatever the seeds.
# VALID_STREAM is what training watches its progress on, so EVAL_STREAM stays untouched by choices.
TRAIN_STREAM, VALID_STREAM, EVAL_STREAM = 1, 3, 7


def training_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, TRAIN_STREAM])


def examples(seed: int, count: int, stream: int = EVAL_STREAM) -> list[Example]:
    """`count` held-out examples, the question types in turn so each is equally represented."""
    rng = np.random.default_rng([seed, stream])
    out: list[Example] = []
    while len(out) < count:
        qtype = QUESTION_TYPES[len(out) % len(QUESTION_TYPES)]
        scene = draw_scene(rng, 2 if qtype == "position" and rng.random() < 0.5 else None)
        qa = ask(scene, qtype, rng)
        if qa is not None:
            out.append(Example(scene, qa[0], qa[1], qtype))
    return out


def questions(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str, str, Shape | None]]:
    """Every question the scene answers clearly, in random order: the colour and the shape of each
    shape, the count, each clear extreme, a caption. (question, answer, type, the one shape the
    answer is about or None)"""
    out: list[tuple[str, str, str, Shape | None]] = []
    for s in scene.shapes:
        out += [(*_colour_of(s), "colour", s), (*_shape_of(s), "shape", s)]
    out.append((*_count(scene), "count", None))
    out += [(*_position(side, s), "position", s) for side, s in _extremes(scene).items()]
    out.append((*_caption(scene, rng), "caption", None))
    return [out[i] for i in rng.permutation(len(out))]


def corpus() -> list[str]:
    """Every word the questions and answers use, for the tokenizer's merges."""
    lines = list(CAPTION_QUESTIONS) + ["How many shapes are there?"]
    for k in SHAPES:
        lines.append(f"What colour is the {k}?")
    for c in COLOURS:
        lines.append(f"What shape is the {c} one?")
        for k in SHAPES:
            lines += [_article(f"{c} {k}"), f"the {c} {k}", f"{_article(f'{c} {k}')}, {_article(f'{c} {k}')} and"]
    for side in ("left", "right"):
        lines.append(f"Which shape is on the {side}?")
    for side in ("top", "bottom"):
        lines.append(f"Which shape is at the {side}?")
    lines += list(NUMBERS.values())
    return lines * 4  # frequent enough that whole words become single tokens
