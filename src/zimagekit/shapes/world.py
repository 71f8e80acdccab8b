"""The shapes world: a closed, exactly judgeable text-to-image task in GenEval's categories.

A scene is 1-4 flat-coloured shapes on a light-grey 64x64 canvas; its caption names exactly
what is drawn. Because every pixel is either background or a palette colour, a scene can be
judged from pixels alone (``judge.py``) -- no detector, no learned judge to reward-hack.

Compositional generalisation is measured with held-out (colour, shape) combinations:
training captions never name them, the evaluation prompts always do (where the category
names a colour at all). Every colour and every shape still appears in training, only
never together in those combinations.

Geometry conventions: pixel (x, y) has its centre at (x + 0.5, y + 0.5); an object's box
is ``[x, x + size) x [y, y + size)``; y grows downwards.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..errors import ZImageKitError

CANVAS = 64
BACKGROUND = (240, 240, 240)
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 90, 220),
    "yellow": (235, 200, 40),
    "purple": (140, 60, 190),
    "orange": (245, 130, 30),
}
SHAPES = ("circle", "square", "triangle")
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# GenEval's relation names; the prompt says "to the left of" / "to the right of".
RELATIONS = ("left of", "right of", "above", "below")
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}

MIN_SIZE, MAX_SIZE = 12, 20  # side of an object's (square) bounding box, pixels
MIN_GAP = 2  # empty pixels between any two boxes, so objects never touch or blur together
MAX_OBJECTS = 4

# Position: "A left of B" holds iff B.cx - A.cx >= POSITION_MARGIN and |A.cy - B.cy| is
# smaller than that horizontal offset (the relation's axis dominates); likewise for the
# other three. Centres are bounding-box centres. The judge uses exactly this test; scenes
# are laid out so it holds with POSITION_SLACK px to spare on both conditions, which
# absorbs the centre shift that blur or antialiasing causes in a measured box.
POSITION_MARGIN = 6.0
POSITION_SLACK = 2.0

# Held out of every training caption; one per shape and per colour, so training still has
# each colour on two shapes and each shape in five colours.
HELD_OUT = (("red", "triangle"), ("blue", "circle"), ("yellow", "square"))
TRAIN_COMBOS = tuple((c, s) for c in COLORS for s in SHAPES if (c, s) not in HELD_OUT)

# Each category has the same number of evaluation entries so per-category accuracies carry
# the same sampling error; categories with fewer distinct prompts repeat them.
EVAL_PER_CATEGORY = 18
# The seen-combination twin of the eval set puts these in HELD_OUT's places: one per shape,
# each in a colour the held-out triple does not use, all of them in training captions.
SEEN_FEATURED = (("green", "triangle"), ("orange", "circle"), ("purple", "square"))
PROMPT_SETS = ("held_out", "seen")


@dataclass(frozen=True)
class ObjectSpec:
    """One object a prompt asks for; ``color=None`` leaves the colour free."""

    shape: str
    color: str | None = None

    def __str__(self) -> str:
        return f"{self.color} {self.shape}" if self.color else self.shape


@dataclass(frozen=True)
class Prompt:
    """A caption and its structured requirement: exactly ``objects`` are in the image, and
    if ``relation`` is set, ``objects[0]`` stands in that relation to ``objects[1]``."""

    text: str
    category: str
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None


@dataclass(frozen=True)
class SceneObject:
    """A drawn shape: its square box has top-left corner (x, y) and side ``size``."""

    shape: str
    color: str
    x: int
    y: int
    size: int

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), end-exclusive."""
        return self.x, self.y, self.x + self.size, self.y + self.size

    @property
    def center(self) -> tuple[float, float]:
        return self.x + self.size / 2, self.y + self.size / 2


@dataclass(frozen=True)
class Scene:
    """A prompt and the objects drawn for it (in the prompt's order)."""

    prompt: Prompt
    objects: tuple[SceneObject, ...]

    @property
    def caption(self) -> str:
        return self.prompt.text

    @property
    def category(self) -> str:
        return self.prompt.category


# ----------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------


def _noun_phrase(spec: ObjectSpec) -> str:
    # "an orange circle": text encoders were trained on English; the parser takes "a" too.
    words = str(spec)
    return ("an " if words[0] in "aeiou" else "a ") + words


def _relation_phrase(relation: str) -> str:
    return "to the " + relation if relation in ("left of", "right of") else relation


def make_prompt(category: str, objects: tuple[ObjectSpec, ...], relation: str | None = None) -> Prompt:
    """Write the caption of a requirement in the grammar of its category."""
    if category == "counting":
        text = f"{COUNT_WORDS[len(objects)]} {objects[0]}s"
    elif category == "position":
        text = f"{_noun_phrase(objects[0])} {_relation_phrase(relation)} {_noun_phrase(objects[1])}"
    else:
        text = " and ".join(_noun_phrase(o) for o in objects)
    return Prompt(text, category, tuple(objects), relation)


_COLOR = "|".join(COLORS)
_SHAPE = "|".join(SHAPES)
_NP = rf"an? (?:({_COLOR}) )?({_SHAPE})"
_POSITION_RE = re.compile(rf"{_NP} (to the left of|to the right of|above|below) {_NP}")
_COUNTING_RE = re.compile(rf"({'|'.join(COUNT_WORDS.values())}) (?:({_COLOR}) )?({_SHAPE})s")
_OBJECTS_RE = re.compile(rf"{_NP}(?: and {_NP})?")


def parse_prompt(text: str) -> Prompt:
    """Read any shapes-world caption back into its requirement.

    Case, surrounding whitespace and a final period are ignored, "a"/"an" are
    interchangeable, and a colour may be left out anywhere (it is then free). The category
    follows from the form: a number word is counting, a relation is position, two objects
    are color_attr if a colour is named, else two_object; one object is colors or
    single_object likewise.
    """
    norm = " ".join(text.lower().split()).rstrip(".")
    if m := _POSITION_RE.fullmatch(norm):
        c1, s1, phrase, c2, s2 = m.groups()
        objects = (ObjectSpec(s1, c1), ObjectSpec(s2, c2))
        return make_prompt("position", objects, phrase.removeprefix("to the "))
    if m := _COUNTING_RE.fullmatch(norm):
        word, color, shape = m.groups()
        n = next(k for k, w in COUNT_WORDS.items() if w == word)
        return make_prompt("counting", (ObjectSpec(shape, color),) * n)
    if m := _OBJECTS_RE.fullmatch(norm):
        c1, s1, c2, s2 = m.groups()
        objects = (ObjectSpec(s1, c1),) + ((ObjectSpec(s2, c2),) if s2 else ())
        colored = any(o.color for o in objects)
        if len(objects) == 1:
            return make_prompt("colors" if colored else "single_object", objects)
        return make_prompt("color_attr" if colored else "two_object", objects)
    raise ZImageKitError(
        f"not a shapes-world prompt: {text!r} (expected e.g. 'a red circle', 'three blue squares' "
        "or 'a green triangle to the left of an orange circle')"
    )


@lru_cache(maxsize=None)
def eval_prompts(combos: str = "held_out") -> tuple[Prompt, ...]:
    """The fixed evaluation set: EVAL_PER_CATEGORY entries per category, in CATEGORIES order.

    Built by enumeration, not sampling, so it cannot drift with numpy versions. With
    ``combos="held_out"`` (the evaluation set) every entry whose category names colours names
    at least one HELD_OUT combination. ``combos="seen"`` is its twin for telling what a model
    failed to learn from what it failed to generalise: the same templates with SEEN_FEATURED
    in HELD_OUT's places and every partner a training combination, so no entry names a
    held-out pair.
    """
    if combos not in PROMPT_SETS:
        raise ZImageKitError(f"unknown prompt set {combos!r}; use one of {', '.join(PROMPT_SETS)}")
    featured = HELD_OUT if combos == "held_out" else SEEN_FEATURED
    # color_attr partners: any combination in another colour for the held-out set (held-out
    # ones too), training combinations only for the seen set.
    attr_pool = list(itertools.product(COLORS, SHAPES)) if combos == "held_out" else list(TRAIN_COMBOS)
    n = EVAL_PER_CATEGORY
    ordered_pairs = list(itertools.permutations(SHAPES, 2))
    single = [make_prompt("single_object", (ObjectSpec(s),)) for s in SHAPES]
    two = [make_prompt("two_object", (ObjectSpec(a), ObjectSpec(b))) for a, b in ordered_pairs]
    counting = [
        make_prompt("counting", (ObjectSpec(s, c),) * k) for c, s in featured for k in COUNT_WORDS
    ]
    colors = [make_prompt("colors", (ObjectSpec(s, c),)) for c, s in featured]
    position, color_attr = [], []
    for i in range(n):
        # Cycle featured combos (period 3) against relations (period 4) and let the featured
        # object alternate between the two slots, so no slot or relation is favoured.
        held = ObjectSpec(featured[i % 3][1], featured[i % 3][0])
        c, s = TRAIN_COMBOS[(7 * i + 2) % len(TRAIN_COMBOS)]
        if (s, c) == (held.shape, held.color):  # the seen set's featured pair is a training one
            c, s = TRAIN_COMBOS[(7 * i + 3) % len(TRAIN_COMBOS)]
        pair = (held, ObjectSpec(s, c)) if (i // 3) % 2 == 0 else (ObjectSpec(s, c), held)
        position.append(make_prompt("position", pair, RELATIONS[i % 4]))
        others = [(c, s) for c, s in attr_pool if c != held.color]
        c, s = others[(7 * i + 3) % len(others)]
        pair = (held, ObjectSpec(s, c)) if i % 2 == 0 else (ObjectSpec(s, c), held)
        color_attr.append(make_prompt("color_attr", pair))
    groups = (single, two, counting, colors, position, color_attr)
    return tuple(p for group in groups for p in itertools.islice(itertools.cycle(group), n))


def _as_rng(rng_or_seed) -> np.random.Generator:
    return rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else np.random.default_rng(rng_or_seed)


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def sample_prompt(rng_or_seed, split: str = "train", category: str | None = None) -> Prompt:
    """A random prompt of ``category`` (default: uniform over CATEGORIES).

    ``split="train"`` generates captions that never name a HELD_OUT combination;
    ``split="eval"`` draws from :func:`eval_prompts`.
    """
    rng = _as_rng(rng_or_seed)
    category = category or _pick(rng, CATEGORIES)
    if split == "eval":
        return _pick(rng, [p for p in eval_prompts() if p.category == category])
    if split != "train":
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")

    def combo() -> ObjectSpec:
        color, shape = _pick(rng, TRAIN_COMBOS)
        return ObjectSpec(shape, color)

    if category == "single_object":
        return make_prompt(category, (ObjectSpec(_pick(rng, SHAPES)),))
    if category == "two_object":
        a, b = _pick(rng, list(itertools.permutations(SHAPES, 2)))
        return make_prompt(category, (ObjectSpec(a), ObjectSpec(b)))
    if category == "counting":
        return make_prompt(category, (combo(),) * _pick(rng, list(COUNT_WORDS)))
    if category == "colors":
        return make_prompt(category, (combo(),))
    a = combo()
    # Position needs two tellable-apart objects; color_attr needs two colours.
    while (b := combo()) == a or (category == "color_attr" and b.color == a.color):
        pass
    return make_prompt(category, (a, b), _pick(rng, RELATIONS) if category == "position" else None)


def training_prompts(count: int, seed: int = 0) -> list[str]:
    """The captions of training scenes ``seed .. seed + count - 1`` (``sample_prompt(seed + i)``):
    a prompt source for algorithms that need the world's prompts without its images
    (``zimagekit.prompts.load_prompts("zimagekit.shapes.world:training_prompts", count, seed)``)."""
    return [sample_prompt(seed + i, "train").text for i in range(count)]


# ----------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------


def relation_holds(relation: str, subject, reference, slack: float = 0.0):
    """Whether centre ``subject`` is ``relation`` centre ``reference`` (see POSITION_MARGIN).

    ``slack`` > 0 demands that much extra room on both conditions. Works elementwise on
    arrays of centres.
    """
    dx = np.asarray(subject[0]) - np.asarray(reference[0])
    dy = np.asarray(subject[1]) - np.asarray(reference[1])
    along, across = {"left of": (-dx, dy), "right of": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[relation]
    return (along - slack >= POSITION_MARGIN) & (np.abs(across) + slack < along - slack)


def place_objects(rng_or_seed, items, relation: str | None = None) -> tuple[SceneObject, ...]:
    """Lay out ``items`` ((shape, colour) pairs) at random sizes and positions.

    Boxes are MIN_SIZE..MAX_SIZE, inside the canvas and MIN_GAP apart; with ``relation``,
    item 0 stands in it to item 1 with POSITION_SLACK to spare. Candidates are drawn in
    batches and the first valid one is kept, which is rejection sampling, vectorised.
    """
    rng = _as_rng(rng_or_seed)
    batch = 64
    for _ in range(100):
        placed: list[SceneObject] = []
        for shape, color in items:
            size = rng.integers(MIN_SIZE, MAX_SIZE + 1, batch)
            x = rng.integers(0, CANVAS - size + 1)
            y = rng.integers(0, CANVAS - size + 1)
            ok = np.ones(batch, bool)
            for o in placed:
                x0, y0, x1, y1 = o.bbox
                gap = np.maximum(np.maximum(x0 - (x + size), x - x1), np.maximum(y0 - (y + size), y - y1))
                ok &= gap >= MIN_GAP
            if relation is not None and len(placed) == 1:
                ok &= relation_holds(relation, placed[0].center, (x + size / 2, y + size / 2), POSITION_SLACK)
            if not ok.any():
                break  # this partial layout leaves no room: start over
            i = int(np.argmax(ok))
            placed.append(SceneObject(shape, color, int(x[i]), int(y[i]), int(size[i])))
        else:
            return tuple(placed)
    raise RuntimeError(f"could not lay out {list(items)} on a {CANVAS}px canvas")


def scene_for_prompt(prompt: Prompt, rng_or_seed, split: str = "train") -> Scene:
    """A random layout holding exactly the prompt's objects.

    Free colours are drawn so that a training scene never even shows a HELD_OUT combination;
    evaluation scenes may use any colour.
    """
    rng = _as_rng(rng_or_seed)
    items = []
    for spec in prompt.objects:
        color = spec.color
        if color is None:
            allowed = [c for c in COLORS if split == "eval" or (c, spec.shape) not in HELD_OUT]
            color = _pick(rng, allowed)
        items.append((spec.shape, color))
    return Scene(prompt, place_objects(rng, items, prompt.relation))


def sample_scene(rng_or_seed, split: str = "train") -> Scene:
    """A random category, prompt and layout; deterministic in the seed or generator state."""
    rng = _as_rng(rng_or_seed)
    return scene_for_prompt(sample_prompt(rng, split), rng, split)


def sample_layout(rng_or_seed) -> tuple[SceneObject, ...]:
    """1-4 objects of any colour and shape, HELD_OUT combinations included, with no caption:
    the world's whole image domain, which a caption-free model (the VAE) learns. Captioned
    training scenes never show a HELD_OUT combination, so a VAE trained on them alone fails
    on exactly the objects the evaluation prompts ask for."""
    rng = _as_rng(rng_or_seed)
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    combos = list(itertools.product(SHAPES, COLORS))
    return place_objects(rng, [_pick(rng, combos) for _ in range(n)])


# ----------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean (size, size) mask of a shape filling its box, sampled at pixel centres.

    The triangle's apex is at the top centre and its base is the bottom edge; a row is
    tested at its lower edge so the apex row is never empty.
    """
    c = np.arange(size) + 0.5
    r = size / 2
    if shape == "square":
        return np.ones((size, size), bool)
    if shape == "circle":
        return (c[None, :] - r) ** 2 + (c[:, None] - r) ** 2 <= r * r
    if shape == "triangle":
        return np.abs(c[None, :] - r) <= (np.arange(size)[:, None] + 1) / 2
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene | tuple[SceneObject, ...]) -> np.ndarray:
    """A scene (or bare objects) as a crisp uint8 (64, 64, 3) image: only palette and
    background colours."""
    image = np.empty((CANVAS, CANVAS, 3), np.uint8)
    image[:] = BACKGROUND
    for o in scene.objects if isinstance(scene, Scene) else scene:
        x0, y0, x1, y1 = o.bbox
        image[y0:y1, x0:x1][shape_mask(o.shape, o.size)] = COLORS[o.color]
    return image
