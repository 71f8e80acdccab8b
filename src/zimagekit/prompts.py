"""Prompt sources: where an algorithm that needs prompts but no images (distillation, RL) gets
them. One string names the source, so a config file can say it in one line:

* ``prompts.txt``: one prompt a line (blank lines skipped);
* ``prompts.jsonl`` / ``prompts.csv``: one prompt a row, in column ``column`` (default: the
  first of ``prompt``, ``text``, ``caption`` that the first row has);
* a dataset folder or tar shard: the captions of :class:`~zimagekit.datasets.ImageCaptionDataset`
  (images are not opened);
* ``package.module:function``: ``function(count, seed)`` returns the prompts (how the shapes
  world, ``zimagekit.shapes.world:training_prompts``, plugs in without this module knowing it).

:func:`load_prompts` then keeps the first ``count`` (a file) or draws ``count`` (a function).
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from .errors import ZImageKitError
from .runconfig import import_object

PROMPT_COLUMNS = ("prompt", "text", "caption")
_FUNCTION = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def load_prompts(source: str, count: int | None = None, seed: int = 0, column: str | None = None) -> list[str]:
    """The prompts of ``source`` (see the module docstring): at most ``count`` from a file or
    folder, exactly ``count`` from a function. Raises :class:`ZImageKitError` naming the
    source for anything it cannot read, and for a source with no prompts."""
    path = Path(source)
    if not path.exists() and _FUNCTION.fullmatch(source):
        prompts = _call(source, count, seed)
    elif path.is_dir() or path.suffix == ".tar":
        from .datasets import ImageCaptionDataset

        prompts = ImageCaptionDataset.open(path).captions()
    elif not path.is_file():
        raise ZImageKitError(f"prompt source {source}: no such file or folder (give a .txt/.jsonl/.csv file, a "
                             "dataset folder, or module:function)")
    elif path.suffix == ".jsonl":
        prompts = _column(source, [_json_row(source, n, line) for n, line in _lines(path) if line.strip()], column)
    elif path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            prompts = _column(source, list(csv.DictReader(f)), column)
    else:
        prompts = [line.strip() for _, line in _lines(path) if line.strip()]
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise ZImageKitError(f"prompt source {source} holds no prompts")
    return prompts[:count] if count is not None else prompts


def _lines(path: Path):
    try:
        return enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
    except UnicodeDecodeError:
        raise ZImageKitError(f"prompt source {path} is not UTF-8 text") from None


def _json_row(source: str, n: int, line: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        raise ZImageKitError(f"prompt source {source} line {n} is not JSON") from None
    if not isinstance(row, dict):
        raise ZImageKitError(f"prompt source {source} line {n} is not a JSON object")
    return row


def _column(source: str, rows: list[dict], column: str | None) -> list[str]:
    if not rows:
        return []
    name = column or next((c for c in PROMPT_COLUMNS if c in rows[0]), None)
    if name is None:
        raise ZImageKitError(f"prompt source {source} has none of the columns {', '.join(PROMPT_COLUMNS)}; name the "
                             f"column (it has {', '.join(sorted(rows[0]))})")
    missing = next((n for n, row in enumerate(rows, 1) if row.get(name) is None), None)
    if missing is not None:
        raise ZImageKitError(f"prompt source {source} row {missing} has no {name!r} column")
    return [str(row[name]) for row in rows]


def _call(source: str, count: int | None, seed: int) -> list[str]:
    function = import_object(source, "prompt source")
    if count is None:
        raise ZImageKitError(f"prompt source {source} draws prompts: give their count")
    return [str(p) for p in function(count, seed)]
