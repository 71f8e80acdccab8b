"""A GenEval-style judge for the shapes world that reads objects straight from pixels.

GenEval detects objects with a Mask2Former and checks counts, colours and positions
against the prompt's metadata. The shapes world is closed, so detection is exact
geometry instead:

1. Each pixel is modelled as a palette colour blended with the background (what
   antialiasing and blur produce). It takes the colour whose background-to-colour line it
   lies closest to, if it lies within MAX_RESIDUAL of that line and at least half-way to
   the colour; otherwise it is background or unknown, and ignored.
2. Connected components (8-neighbourhood) per colour of at least MIN_AREA pixels are the
   objects; smaller ones are noise. Objects are >= 2 px apart in the world, so a 3x3 blur
   never joins two of them.
3. A component's shape comes from its bounding box: squares fill it (~1.0), circles fill
   pi/4 (~0.79) and apex-up triangles ~0.5 with only a quarter of their pixels in the top
   half; anything else is a "blob" (it still counts as an object).
4. The image is correct iff it holds exactly the prompt's objects (unlike GenEval, which
   ignores extra objects of unnamed classes: here every object is nameable) and, for
   position prompts, the relation holds between box centres as defined by
   :func:`world.relation_holds`.

Reasons begin with the first failed check -- "wrong count", "wrong shape", "wrong color"
or "wrong position" -- so failures can be tallied by kind. The summary accuracy is
GenEval's: per-category accuracy over images, overall = mean of the category accuracies.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ZImageKitError
from .world import (
    BACKGROUND,
    CANVAS,
    CATEGORIES,
    COLORS,
    POSITION_MARGIN,
    RELATIONS,
    Prompt,
    parse_prompt,
    relation_holds,
)

COLOR_NAMES = tuple(COLORS)
MAX_RESIDUAL = 60.0  # RGB distance from a colour's blend line; noise of std 8 is ~14
MIN_COVERAGE = 0.5  # blend fraction of the colour needed to count as that colour
MIN_AREA = 24  # pixels; the smallest world object, a 12 px triangle, has 84 (80 after a 3x3 blur)

_BG = np.array(BACKGROUND, np.float32)
_DIRS = np.array([COLORS[c] for c in COLOR_NAMES], np.float32) - _BG  # background -> colour


@dataclass(frozen=True)
class Detection:
    """An object found in an image; ``bbox`` is (x0, y0, x1, y1), end-exclusive."""

    color: str
    shape: str
    bbox: tuple[int, int, int, int]
    area: int

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.bbox
        return (x0 + x1) / 2, (y0 + y1) / 2

    def __str__(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Judgement:
    correct: bool
    reason: str
    detected: list[Detection]


# ----------------------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------------------


def to_rgb(image) -> np.ndarray:
    """A uint8 (64, 64, 3) array from a PIL image or an HxWx3/4 uint8 or [0, 1] float array.

    Images at an integer multiple of 64 px are box-downsampled, as a generator may decode
    at a higher resolution.
    """
    if not isinstance(image, np.ndarray):
        from PIL import Image  # only PIL input needs pillow

        if not isinstance(image, Image.Image):
            raise ZImageKitError(f"expected a PIL image or a numpy array, got {type(image).__name__}")
        image = np.asarray(image.convert("RGB"))
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ZImageKitError(f"expected an HxWx3 RGB image, got shape {image.shape}")
    rgb = image[..., :3].astype(np.float32)
    if np.issubdtype(image.dtype, np.floating):
        rgb = rgb * 255
    h, w = rgb.shape[:2]
    if h % CANVAS or w % CANVAS or h != w:
        raise ZImageKitError(f"expected a {CANVAS}x{CANVAS} image (or a multiple), got {w}x{h}")
    k = h // CANVAS
    rgb = rgb.reshape(CANVAS, k, CANVAS, k, 3).mean(axis=(1, 3))
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def classify_pixels(rgb: np.ndarray) -> np.ndarray:
    """(H, W) int array: index into COLOR_NAMES, or -1 for background and unknown."""
    p = rgb.reshape(-1, 3).astype(np.float32) - _BG
    alpha = np.clip(p @ _DIRS.T / (_DIRS**2).sum(1), 0.0, 1.0)  # (N, colours)
    residual = np.linalg.norm(p[:, None, :] - alpha[..., None] * _DIRS, axis=-1)
    best = residual.argmin(1)
    rows = np.arange(len(p))
    ok = (residual[rows, best] <= MAX_RESIDUAL) & (alpha[rows, best] >= MIN_COVERAGE)
    return np.where(ok, best, -1).reshape(rgb.shape[:2])


def _label_components(classes: np.ndarray) -> np.ndarray:
    """Component label per pixel (the smallest flat index in its component; -1 off-class).

    Min-label propagation between equal-class 8-neighbours, with pointer jumping
    (label <- label[label]) so it converges in a few numpy passes, not one per pixel.
    """
    h, w = classes.shape
    fg = classes >= 0
    labels = np.arange(h * w).reshape(h, w)
    padded_cls = np.pad(classes, 1, constant_values=-1)
    offsets = [(dy, dx) for dy, dx in itertools.product((-1, 0, 1), repeat=2) if dy or dx]
    # links[k]: the pixel and its k-th neighbour are both of the same colour
    links = [fg & (padded_cls[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] == classes) for dy, dx in offsets]
    while True:
        padded = np.pad(labels, 1, mode="edge")
        new = labels
        for (dy, dx), link in zip(offsets, links):
            new = np.where(link, np.minimum(new, padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]), new)
        new = new.ravel()[new]
        if np.array_equal(new, labels):
            return np.where(fg, labels, -1)
        labels = new


def _shape_of(mask: np.ndarray) -> str:
    """Name the shape of a component cropped to its bounding box.

    Features use each row's span (first to last pixel), so holes that noise punches into
    a shape do not change it.
    """
    h, w = mask.shape
    if not 0.7 <= w / h <= 1.4:  # world shapes all have square boxes
        return "blob"
    any_px = mask.any(1)
    first = np.where(any_px, np.argmax(mask, 1), 0)
    last = np.where(any_px, w - 1 - np.argmax(mask[:, ::-1], 1), -1)
    spans = last - first + 1
    fill = spans.sum() / (w * h)
    top, bottom = spans[: h // 2].sum(), spans[h - h // 2 :].sum()
    top_share = top / max(top + bottom, 1)
    if top_share < 0.4 and 0.35 <= fill <= 0.7:
        return "triangle"
    if 0.4 <= top_share <= 0.6:
        if fill >= 0.9:
            return "square"
        if 0.65 <= fill < 0.9:
            return "circle"
    return "blob"


def detect_objects(image) -> list[Detection]:
    """The objects in an image, ordered by their first pixel in raster order."""
    classes = classify_pixels(to_rgb(image))
    labels = _label_components(classes)
    ids, areas = np.unique(labels[labels >= 0], return_counts=True)
    found = []
    for lab, area in zip(ids, areas):
        if area < MIN_AREA:
            continue
        ys, xs = np.nonzero(labels == lab)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        crop = labels[y0:y1, x0:x1] == lab
        color = COLOR_NAMES[classes.flat[lab]]
        found.append(Detection(color, _shape_of(crop), (int(x0), int(y0), int(x1), int(y1)), int(area)))
    return found


# ----------------------------------------------------------------------------------------
# Judging
# ----------------------------------------------------------------------------------------


def _tally(names) -> str:
    counts = Counter(str(n) for n in names)
    return ", ".join(f"{k} {name}{'s' if k > 1 else ''}" for name, k in sorted(counts.items())) or "nothing"


def judge_image(image, prompt: str | Prompt) -> Judgement:
    """Judge one image against a prompt (a caption or a parsed :class:`Prompt`)."""
    req = prompt if isinstance(prompt, Prompt) else parse_prompt(prompt)
    found = detect_objects(image)

    def fail(kind: str, detail: str) -> Judgement:
        return Judgement(False, f"wrong {kind}: {detail}", found)

    expected = f"expected {_tally(req.objects)}, found {_tally(found)}"
    if len(found) != len(req.objects):
        return fail("count", expected)
    if sorted(d.shape for d in found) != sorted(o.shape for o in req.objects):
        return fail("shape", expected)
    # Assignments of detections to the named objects that agree on shape and colour.
    matches = [
        perm
        for perm in itertools.permutations(found)
        if all(d.shape == o.shape and o.color in (None, d.color) for d, o in zip(perm, req.objects))
    ]
    if not matches:
        return fail("color", expected)
    if not any(req.relation is None or relation_holds(req.relation, m[0].center, m[1].center) for m in matches):
        a, b = matches[0][:2]
        dx, dy = a.center[0] - b.center[0], a.center[1] - b.center[1]
        actual = next((r for r in RELATIONS if relation_holds(r, a.center, b.center)), None)
        seen = f"it is {actual} it" if actual else f"no relation holds with the {POSITION_MARGIN:g} px margin"
        return fail("position", f"expected the {a} {req.relation} the {b}, but {seen} (dx={dx:+.1f}, dy={dy:+.1f} px)")
    return Judgement(True, f"correct: found {_tally(found)}", found)


# ----------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------


@dataclass
class Report:
    """Per-image records (prompt, category, correct, reason, plus any id fields)."""

    records: list[dict] = field(default_factory=list)

    def accuracy(self) -> dict[str, float]:
        """Accuracy per category that has images, in CATEGORIES order."""
        out = {}
        for cat in CATEGORIES:
            hits = [r["correct"] for r in self.records if r["category"] == cat]
            if hits:
                out[cat] = sum(hits) / len(hits)
        return out

    @property
    def overall(self) -> float:
        """GenEval's overall score: the mean of the category accuracies (not of images)."""
        acc = self.accuracy()
        return sum(acc.values()) / len(acc) if acc else 0.0

    def write_jsonl(self, path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            for r in self.records:
                f.write(json.dumps(r) + "\n")

    def summary(self) -> str:
        lines = [f"{'category':<14} {'images':>7} {'correct':>8} {'accuracy':>9}"]
        for cat in CATEGORIES:
            hits = [r["correct"] for r in self.records if r["category"] == cat]
            acc = f"{100 * sum(hits) / len(hits):8.1f}%" if hits else f"{'-':>9}"
            lines.append(f"{cat:<14} {len(hits):>7} {sum(hits):>8} {acc}")
        n = len(self.accuracy())
        lines.append(f"{f'overall (mean of {n} categories)':<31} {100 * self.overall:8.1f}%")
        return "\n".join(lines)


def judge_all(samples) -> Report:
    """Judge ``(image, prompt)`` or ``(image, prompt, ids)`` tuples; ``ids`` (a dict, e.g.
    file name and seed) is copied into the image's record."""
    report = Report()
    for image, prompt, *rest in samples:
        req = prompt if isinstance(prompt, Prompt) else parse_prompt(prompt)
        j = judge_image(image, req)
        ids = rest[0] if rest else {}
        record = {"prompt": req.text, "category": req.category, "correct": j.correct, "reason": j.reason}
        report.records.append({**ids, **record})
    return report


# ----------------------------------------------------------------------------------------
# CLI: zimagekit shapes judge
# ----------------------------------------------------------------------------------------


def _read_metadata(path: Path) -> dict[str, dict]:
    """file_name -> metadata line, from a Hugging Face imagefolder-style metadata.jsonl."""
    entries = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise ZImageKitError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not (isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in ("file_name", "prompt"))):
            raise ZImageKitError(f"{path}:{n}: each line needs string fields 'file_name' and 'prompt'")
        entries[entry["file_name"]] = entry
    return entries


def load_folder(folder, unreadable: list[str] | None = None) -> list[tuple]:
    """``(image, prompt, ids)`` for every PNG in ``folder``, sorted by file name.

    The prompt comes from ``metadata.jsonl`` if it lists the file (its other fields become
    ids), else from the first line of the PNG's ``parameters`` text chunk. A file that cannot
    be read as an image is skipped, and its name appended to ``unreadable``; a folder with no
    readable image at all is an error.
    """
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    if not folder.is_dir():
        raise ZImageKitError(f"no such folder: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png" and p.is_file())
    if not files:
        raise ZImageKitError(f"no .png images in {folder}")
    meta_path = folder / "metadata.jsonl"
    metadata = _read_metadata(meta_path) if meta_path.is_file() else {}
    if missing := sorted(set(metadata) - {p.name for p in files}):
        raise ZImageKitError(f"{meta_path} names images that are not in the folder: {', '.join(missing[:3])}")
    samples = []
    for path in files:
        try:
            with Image.open(path) as im:
                im.load()
                image = np.asarray(im.convert("RGB"))
                info = im.info
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
            if unreadable is not None:
                unreadable.append(path.name)
            continue
        text = metadata[path.name]["prompt"] if path.name in metadata else info.get("parameters", "")
        text = text.split("\n", 1)[0].strip()
        if not text:
            raise ZImageKitError(f"{path}: no prompt (add it to metadata.jsonl or the PNG 'parameters' text chunk)")
        try:
            prompt = parse_prompt(text)
        except ZImageKitError as e:
            raise ZImageKitError(f"{path.name}: {e}") from None
        ids = {k: v for k, v in metadata.get(path.name, {}).items() if k != "prompt"}
        samples.append((image, prompt, {**ids, "file_name": path.name}))
    if not samples:
        raise ZImageKitError(f"none of the {len(files)} .png files in {folder} can be read as an image")
    return samples


def main(argv=None) -> int:
    """``zimagekit shapes judge FOLDER``: judge a folder of shapes-world images, print the table."""
    parser = argparse.ArgumentParser(
        prog="zimagekit shapes judge",
        description=(
            "Judge generated shapes-world images GenEval-style: each image is correct or not "
            "(with a reason), accuracy is reported per category and overall as the mean of "
            "the six category accuracies."
        ),
    )
    parser.add_argument(
        "folder",
        type=Path,
        help=(
            "folder of 64x64 (or 128, 256, ... px) PNG images; each image's prompt is read from "
            "FOLDER/metadata.jsonl (one JSON object per line with 'file_name' and 'prompt'; other "
            "fields are copied to the results) or else from the first line of the PNG's "
            "'parameters' text chunk"
        ),
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        metavar="PATH",
        help="per-image results as JSON lines (prompt, category, correct, reason, file_name, ...); "
        "default: FOLDER/results.jsonl",
    )
    args = parser.parse_args(argv)
    unreadable: list[str] = []
    try:
        report = judge_all(load_folder(args.folder, unreadable))
        output = args.output or args.folder / "results.jsonl"
        try:
            report.write_jsonl(output)
        except OSError as e:
            raise ZImageKitError(f"cannot write {output}: {e.strerror}") from None
    except ZImageKitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    if unreadable:
        print(f"skipped {len(unreadable)} file(s) that are not readable images: {', '.join(unreadable)}")
    print(f"per-image results: {output}")
    return 0
