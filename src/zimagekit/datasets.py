"""Image–caption datasets in the layouts people already have, and aspect-ratio buckets.

Layouts (ecosystem conventions):

* a folder of images, each with a same-name ``.txt`` caption (ai-toolkit, kohya);
* a folder with ``metadata.jsonl`` or ``metadata.csv`` naming ``file_name,text``
  (Hugging Face imagefolder) or ``image,prompt`` (DiffSynth-Studio) columns;
* webdataset tar shards: members ``KEY.jpg|png|webp`` and ``KEY.txt`` side by side;
* ``package.module:function``: ``function(count)`` returns a :class:`CaptionedImages` of
  ``count`` items, for images made by code (how the shapes world,
  ``zimagekit.shapes.teacher:scenes``, plugs in without this module knowing it).

Images are opened lazily. One that cannot be decoded is skipped and counted
(``dataset.skipped``), never an exception in the middle of an epoch; the frozen-encoder
cache (:mod:`zimagekit.latent_cache`) is where every image gets read once.

Buckets follow Z-Image's omni pre-training (arbitrary resolutions and aspect ratios): each
bucket keeps roughly the base area, both sides multiples of 16 px, and an image goes to the
bucket nearest its aspect ratio, resized to cover it and centre-cropped.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .errors import ZImageKitError
from .runconfig import import_object

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class CaptionedImages(Protocol):
    """What the latent cache reads: captions without opening images, images one at a time,
    and rows that change whenever an item does (the cache's key)."""

    def __len__(self) -> int: ...

    def captions(self) -> list[str]: ...

    def load(self, i: int):
        """(PIL RGB image, caption), or None if the image cannot be read."""

    def identity(self) -> Iterable: ...


def open_dataset(source: str, count: int | None = None) -> CaptionedImages:
    """The dataset ``source`` names (see the module docstring): a folder's or shard's first
    ``count`` items (all if None), or ``count`` items made by a function."""
    if not Path(source).exists() and ":" in source:
        if count is None:
            raise ZImageKitError(f"dataset {source} makes its images: give their count (data.count)")
        return import_object(source, "dataset")(count)
    dataset = ImageCaptionDataset.open(source)
    if count is not None:
        dataset.samples = dataset.samples[:count]
    return dataset


@dataclass
class Sample:
    """Where an image lives (a file, or a member of a tar shard) and its caption."""

    source: str
    caption: str
    member: str | None = None  # tar member name when ``source`` is a shard


@dataclass
class ImageCaptionDataset:
    samples: list[Sample]
    skipped: int = 0  # images that could not be decoded, counted as they are met
    _warned: set = field(default_factory=set, repr=False)

    @classmethod
    def open(cls, root) -> "ImageCaptionDataset":
        """Read a folder (captions from metadata.jsonl, metadata.csv or .txt files) or a tar
        shard / folder of tar shards."""
        root = Path(root)
        if not root.exists():
            raise ZImageKitError(f"dataset {root} does not exist")
        if root.is_file():
            if root.suffix != ".tar":
                raise ZImageKitError(f"dataset {root}: a single file must be a .tar shard")
            return cls(_tar_samples([root]))
        if (root / "metadata.jsonl").is_file():
            rows = []
            for n, line in enumerate((root / "metadata.jsonl").read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        raise ZImageKitError(f"{root / 'metadata.jsonl'} line {n} is not JSON") from None
            samples = _rows_to_samples(root, rows, "metadata.jsonl")
        elif (root / "metadata.csv").is_file():
            with open(root / "metadata.csv", newline="", encoding="utf-8") as f:
                samples = _rows_to_samples(root, list(csv.DictReader(f)), "metadata.csv")
        elif shards := sorted(root.glob("*.tar")):
            samples = _tar_samples(shards)
        else:
            samples = [Sample(str(p), p.with_suffix(".txt").read_text(encoding="utf-8").strip())
                       for p in sorted(root.iterdir())
                       if p.suffix.lower() in IMAGE_SUFFIXES and p.with_suffix(".txt").is_file()]
        if not samples:
            raise ZImageKitError(f"dataset {root} holds no captioned images (images with same-name .txt files, "
                                 "metadata.jsonl/.csv, or .tar shards)")
        return cls(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def captions(self) -> list[str]:
        return [s.caption for s in self.samples]

    def identity(self) -> Iterable:
        """Each item's location, caption, size and modification time."""
        for s in self.samples:
            stat = os.stat(s.source)
            yield [s.source, s.member, s.caption, stat.st_size, stat.st_mtime_ns]

    def load(self, i: int):
        """(PIL RGB image, caption), or None (counted in ``skipped``) if it cannot be decoded."""
        from PIL import Image, UnidentifiedImageError

        s = self.samples[i]
        try:
            if s.member is None:
                with Image.open(s.source) as im:
                    image = im.convert("RGB")
            else:
                with tarfile.open(s.source) as tar:
                    image = Image.open(io.BytesIO(tar.extractfile(s.member).read())).convert("RGB")
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            self.skipped += 1
            if i not in self._warned:
                self._warned.add(i)
                logger.warning("skipping unreadable image %s%s: %s", s.source, f"::{s.member}" if s.member else "", e)
            return None
        return image, s.caption


def _rows_to_samples(root: Path, rows: list[dict], name: str) -> list[Sample]:
    samples = []
    for n, row in enumerate(rows, 1):
        file = row.get("file_name", row.get("image"))
        text = row.get("text", row.get("prompt"))
        if file is None or text is None:
            raise ZImageKitError(f"{root / name} row {n}: needs file_name,text or image,prompt columns; got {sorted(row)}")
        samples.append(Sample(str(root / file), str(text)))
    return samples


def _tar_samples(shards: list[Path]) -> list[Sample]:
    samples = []
    for shard in shards:
        try:
            with tarfile.open(shard) as tar:
                members = {m.name: m for m in tar.getmembers() if m.isfile()}
                for name in sorted(members):
                    stem, suffix = name.rsplit(".", 1) if "." in name else (name, "")
                    if f".{suffix.lower()}" in IMAGE_SUFFIXES and f"{stem}.txt" in members:
                        caption = tar.extractfile(members[f"{stem}.txt"]).read().decode("utf-8").strip()
                        samples.append(Sample(str(shard), caption, member=name))
        except tarfile.TarError as e:
            raise ZImageKitError(f"{shard}: not a readable tar shard ({e})") from None
    return samples


# ----------------------------------------------------------------------------------------
# Aspect-ratio buckets
# ----------------------------------------------------------------------------------------


def make_buckets(base: int = 1024, multiple: int = 16, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) buckets of about ``base²`` pixels, sides multiples of ``multiple``,
    aspect ratios between 1/max_ratio and max_ratio (one bucket per width step)."""
    area, out = base * base, set()
    w = multiple
    while w <= base * math.sqrt(max_ratio):
        h = round(area / w / multiple) * multiple
        if h >= multiple and 1 / max_ratio <= w / h <= max_ratio:
            out.add((w, h))
        w += multiple
    return sorted(out, key=lambda wh: wh[0] / wh[1])


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest in log space (so 2:1 and 1:2 are equally far
    from 1:1)."""
    r = math.log(width / height)
    return min(buckets, key=lambda wh: abs(math.log(wh[0] / wh[1]) - r))


def fit_to_bucket(image, bucket: tuple[int, int]):
    """Resize to cover the bucket (keeping the aspect ratio), then centre-crop to it."""
    from PIL import Image

    bw, bh = bucket
    scale = max(bw / image.width, bh / image.height)
    w, h = max(bw, round(image.width * scale)), max(bh, round(image.height * scale))
    image = image.resize((w, h), Image.LANCZOS)
    left, top = (w - bw) // 2, (h - bh) // 2
    return image.crop((left, top, left + bw, top + bh))
