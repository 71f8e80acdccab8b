"""The models that ship inside the package and the sampling defaults a model folder records,
readable without torch (the command line shows them in ``--help``)."""

from __future__ import annotations

import json
from pathlib import Path

# Z-Image-Turbo's sampling defaults: 8 transformer calls, no guidance, 1024².
TURBO_DEFAULTS = {"num_inference_steps": 8, "guidance_scale": 0.0, "height": 1024, "width": 1024}

# Models that ship inside the package, most preferred first: the few-step student once it
# exists, else the teacher.
SHIPPED_MODELS = Path(__file__).parent / "models"
SHIPPED_PREFERENCE = ("shapes-turbo", "shapes-teacher")


def default_model_folder() -> Path | None:
    """The shipped model ``zimagekit generate`` uses when no --model is given."""
    for name in SHIPPED_PREFERENCE:
        if (SHIPPED_MODELS / name / "model_index.json").is_file():
            return SHIPPED_MODELS / name
    return None


def recorded_defaults(folder: str | Path) -> dict:
    """Turbo's defaults overridden by what ``folder``'s model_index.json records under
    ``_zimagekit_defaults`` (diffusers ignores the key). For display: an unreadable file gives
    Turbo's; loading a folder checks the key properly (``pipeline.ModelFolder``)."""
    try:
        recorded = json.loads((Path(folder) / "model_index.json").read_text(encoding="utf-8"))["_zimagekit_defaults"]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = {}
    if not isinstance(recorded, dict):
        recorded = {}
    return {**TURBO_DEFAULTS, **{k: v for k, v in recorded.items() if k in TURBO_DEFAULTS}}
