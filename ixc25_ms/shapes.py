"""Drawn pictures of coloured shapes, the four questions the embedded default model answers, and their checker."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .prompt import IMAGE_TAG

COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (214, 38, 38), "green": (38, 158, 62), "blue": (42, 86, 214),
    "yellow": (236, 204, 36), "purple": (138, 58, 176), "orange": (246, 134, 28)}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = {1: "What colour is the {shape}?", 2: "How many {shape}s are there?", 3: "What shape is the {colour} one?",
             4: "Describe the image."}
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
CHITCHAT = [
    ("Hello!", "Hello! Show me a picture and ask me about it."),
    ("Hi", "Hi! Show me a picture and ask me about it."),
    ("Hello, who are you?", "I am a small picture assistant. I can tell colours, shapes and counts."),
    ("What can you do?", "I can tell you the colours and shapes of the objects in a picture, and count them."),
    ("Can you help me?", "Yes. Show me a picture and ask about its shapes and colours."),
    ("Thank you!", "You are welcome."),
    ("Thanks.", "You are welcome."),
    ("Good morning!", "Good morning! Show me a picture and ask me about it."),
    ("Bye!", "Goodbye!"),
    ("How are you?", "I am fine, thank you. Show me a picture and ask me about it."),
]


@dataclass
class Obj:
    shape: str
    colour: str
    cx: float
    cy: float
    size: float  # radius of the circumscribed circle, px
    angle: float = 0.0
    outline: Optional[Tuple[int, int, int]] = None
    width: int = 0


@dataclass
class Scene:
    width: int
    height: int
    objects: List[Obj] = field(default_factory=list)

    def count(self, shape: str) -> int:
        return sum(o.shape == shape for o in self.objects)

    def with_colour(self, colour: str) -> List[Obj]:
        return [o for o in self.objects if o.colour == colour]


def random_scene(rng: np.random.Generator, n: Optional[int] = None, sides: Tuple[int, int] = (200, 1200),
                 radius: Optional[Tuple[float, float]] = None) -> Scene:
    """1-4 objects (or n) on a canvas of 200-1200 px a side (or `sides`) with an aspect ratio up to 3:1 either
    way; sizes and positions varied, objects apart from each other. `radius`: (low, high) of an object's
    circumradius as a share of the shorter side (default: 0.08-0.32 for one object, 0.07-0.22 for several)."""
    while True:
        w = int(rng.integers(sides[0], sides[1] + 1))
        h = int(np.clip(w / math.exp(rng.uniform(-math.log(3), math.log(3))), sides[0], sides[1]))
        if 1 / 3 <= w / h <= 3:
            break
    n = int(rng.integers(1, 5)) if n is None else n
    scene = Scene(w, h)
    short = min(w, h)
    for _ in range(200):
        if len(scene.objects) == n:
            break
        lo, hi = radius or ((0.07, 0.22) if n > 1 else (0.08, 0.32))
        r = short * rng.uniform(lo, hi)
        cx, cy = rng.uniform(r + 2, w - r - 2), rng.uniform(r + 2, h - r - 2)
        if all(math.hypot(cx - o.cx, cy - o.cy) > r + o.size + 0.04 * short for o in scene.objects):
            scene.objects.append(Obj(SHAPES[int(rng.integers(3))], list(COLOURS)[int(rng.integers(6))], cx, cy, r))
    if len(scene.objects) < n:  # crowded: start over with a new canvas
        return random_scene(rng, n, sides, radius)
    for o in scene.objects:
        o.angle = float(rng.uniform(0, 360)) if o.shape != "circle" else 0.0
        if rng.random() < 0.3:
            o.outline = tuple(int(c) for c in rng.integers(0, 90, 3))
            o.width = int(max(1, round(o.size * rng.uniform(0.04, 0.12))))
    return scene


def _jitter(rgb, rng, amount=18):
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _polygon(o: Obj) -> List[Tuple[float, float]]:
    k = 4 if o.shape == "square" else 3
    return [(o.cx + o.size * math.cos(math.radians(o.angle + 360 * i / k)),
             o.cy + o.size * math.sin(math.radians(o.angle + 360 * i / k))) for i in range(k)]


def render(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """An RGB picture of the scene: a light background (plain, or a faint gradient / noise), each object filled
    with its colour jittered, optionally outlined in a dark tone."""
    bg = np.array(_jitter((244, 241, 234), rng, 12), np.float32)
    img = np.ones((scene.height, scene.width, 3), np.float32) * bg
    style = rng.random()
    if style < 0.3:  # faint gradient
        ramp = np.linspace(-1, 1, scene.width if rng.random() < 0.5 else scene.height, dtype=np.float32)
        ramp = ramp[None, :, None] if len(ramp) == scene.width else ramp[:, None, None]
        img = img + ramp * rng.uniform(3, 10)
    elif style < 0.5:  # faint noise
        img = img + rng.normal(0, rng.uniform(1, 4), img.shape).astype(np.float32)
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for o in scene.objects:
        fill = _jitter(COLOURS[o.colour], rng)
        if o.shape == "circle":
            box = (o.cx - o.size, o.cy - o.size, o.cx + o.size, o.cy + o.size)
            draw.ellipse(box, fill=fill, outline=o.outline, width=o.width)
        else:
            pts = _polygon(o)
            draw.polygon(pts, fill=fill)
            if o.outline is not None:
                draw.line(pts + [pts[0]], fill=o.outline, width=o.width, joint="curve")
    if rng.random() < 0.2:
        im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    return im


def region_map(scene: Scene, values: Sequence[int]) -> Image.Image:
    """An 'L' image of the scene's size where object i's pixels (fill and outline, drawn in render's order, so a
    later object covers an earlier one) hold values[i] and the background 0: where each object lies."""
    im = Image.new("L", (scene.width, scene.height), 0)
    draw = ImageDraw.Draw(im)
    for o, v in zip(scene.objects, values):
        line = v if o.outline is not None else None
        if o.shape == "circle":
            draw.ellipse((o.cx - o.size, o.cy - o.size, o.cx + o.size, o.cy + o.size), fill=v, outline=line,
                         width=o.width)
        else:
            pts = _polygon(o)
            draw.polygon(pts, fill=v)
            if line is not None:
                draw.line(pts + [pts[0]], fill=v, width=o.width, joint="curve")
    return im


def one_object_scene(seed: int, sides: Tuple[int, int] = (200, 560),
                     radius: Optional[Tuple[float, float]] = None) -> Tuple[Scene, Image.Image]:
    """A one-object scene drawn from `seed` (canvas sides in `sides`, object radius as random_scene's) and its
    picture."""
    rng = np.random.default_rng(seed)
    scene = random_scene(rng, 1, sides, radius)
    return scene, render(scene, rng)


def one_object_picture(seed: int, sides: Tuple[int, int] = (200, 560),
                       radius: Optional[Tuple[float, float]] = None) -> Tuple[Image.Image, int, int]:
    """A one-object picture drawn from `seed` (one_object_scene), its colour index (COLOURS order) and its shape
    index (SHAPES order): the probes' pictures."""
    scene, im = one_object_scene(seed, sides, radius)
    o = scene.objects[0]
    return im, list(COLOURS).index(o.colour), SHAPES.index(o.shape)


# ------------------------------------------------------------------------------------------ questions and answers
def _with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def describe(scene: Scene) -> str:
    """'A red circle and two blue squares.': every (colour, shape) with its count, shapes then colours in order."""
    groups = {}
    for o in scene.objects:
        groups[(o.shape, o.colour)] = groups.get((o.shape, o.colour), 0) + 1
    parts = []
    for shape in SHAPES:
        for colour in COLOURS:
            n = groups.get((shape, colour), 0)
            if n == 1:
                parts.append(_with_article(f"{colour} {shape}"))
            elif n > 1:
                parts.append(f"{NUMBERS[n]} {colour} {shape}s")
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


def answer(scene: Scene, qtype: int, subject: str) -> str:
    """The reference answer of question `qtype` about `subject` (a shape for 1 and 2, a colour for 3)."""
    if qtype == 1:
        return f"The {subject} is {next(o.colour for o in scene.objects if o.shape == subject)}."
    if qtype == 2:
        n = scene.count(subject)
        return f"There is 1 {subject}." if n == 1 else f"There are {n} {subject}s."
    if qtype == 3:
        return f"The {subject} one is {_with_article(scene.with_colour(subject)[0].shape)}."
    return describe(scene)


def valid_questions(scene: Scene) -> List[Tuple[int, str]]:
    """Every (type, subject) the task allows for this scene: 1 needs exactly one object of that shape, 3 exactly
    one of that colour; 2 may ask about an absent shape (answer 0)."""
    out = [(1, s) for s in SHAPES if scene.count(s) == 1]
    out += [(2, s) for s in SHAPES]
    out += [(3, c) for c in COLOURS if len(scene.with_colour(c)) == 1]
    return out + [(4, "")]


def question(qtype: int, subject: str) -> str:
    return QUESTIONS[qtype].format(shape=subject, colour=subject)


# ------------------------------------------------------------------------------------------ checking answers
_COUNT = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}
_ITEM = re.compile(r"\b(a|an|one|two|three|four|five|six|\d+)\s+(" + "|".join(COLOURS) + r")\s+(" + "|".join(SHAPES) + r")s?\b")


def question_type(q: str) -> Optional[Tuple[int, str]]:
    """(type, subject) of one of the four questions, exactly as worded, `<ImageHere>` placeholders aside (the
    official format may mark where the picture goes); None otherwise."""
    q = q.replace(IMAGE_TAG, "")
    for t, pattern in QUESTIONS.items():
        rx = "^" + re.escape(pattern).replace(r"\{shape\}", "(circle|square|triangle)").replace(
            r"\{colour\}", "(" + "|".join(COLOURS) + ")") + "$"
        m = re.match(rx, q.strip())
        if m:
            return t, (m.group(1) if m.groups() else "")
    return None


def facts(text: str) -> Dict[Tuple[str, str], int]:
    """(colour, shape) -> count named in a description."""
    out: Dict[Tuple[str, str], int] = {}
    for n, colour, shape in _ITEM.findall(text.lower()):
        k = (colour, shape)
        out[k] = out.get(k, 0) + (int(n) if n.isdigit() else _COUNT[n])
    return out


def is_correct(qtype: int, subject: str, expected: str, got: str) -> bool:
    """Whether `got` answers as `expected` does: type 1 names the expected colour and no other, 2 states the count
    as the only number, 3 names the expected shape and no other, 4 names every object's colour and shape (the
    same multiset)."""
    low = got.lower()
    if qtype == 1:
        want = [c for c in COLOURS if re.search(rf"\b{c}\b", expected.lower())]
        said = [c for c in COLOURS if re.search(rf"\b{c}\b", low)]
        return said == want
    if qtype == 2:
        return re.findall(r"\d+", got) == re.findall(r"\d+", expected)
    if qtype == 3:
        want = [s for s in SHAPES if re.search(rf"\b{s}s?\b", expected.lower())]
        said = [s for s in SHAPES if re.search(rf"\b{s}s?\b", low)]
        return said == want
    return facts(got) == facts(expected) and bool(facts(expected))


def conversation(scene: Scene, rng: np.random.Generator, turns: int) -> List[Tuple[int, str, str, str]]:
    """`turns` distinct questions about the scene: (type, subject, question, answer) each, types mixed."""
    valid = valid_questions(scene)
    by_type: Dict[int, List[Tuple[int, str]]] = {}
    for t, s in valid:
        by_type.setdefault(t, []).append((t, s))
    types = list(by_type)
    rng.shuffle(types)
    picked = []
    for t in (types * 2)[:turns]:
        opts = [x for x in by_type[t] if x not in picked]
        if opts:
            picked.append(opts[int(rng.integers(len(opts)))])
    return asked(scene, picked)


def asked(scene: Scene, pairs) -> List[Tuple[int, str, str, str]]:
    """(type, subject) pairs -> (type, subject, question, reference answer) turns about the scene."""
    return [(t, s, question(t, s), answer(scene, t, s)) for t, s in pairs]
