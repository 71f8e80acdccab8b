"""examples/z_image_lesson.ipynb runs top to bottom without a cell error, so it never rots.

It runs against the shipped shapes teacher when the package has it; until then against a tiny
random Z-Image folder with the shapes tokenizer and the teacher's sampling defaults, passed to
the notebook through ZIMAGEKIT_LESSON_TEACHER.
"""

import json
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from zimagekit.pipeline import SHIPPED_MODELS

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "z_image_lesson.ipynb"
# What configs/shapes/teacher.yaml exports: 50 Euler steps with CFG w = 3 at 64x64.
TEACHER_DEFAULTS = {"num_inference_steps": 50, "guidance_scale": 3.0, "height": 64, "width": 64}


def tiny_teacher(folder: Path) -> Path:
    """A random stand-in for the shapes teacher: tiny components, the real shapes tokenizer."""
    from pipeline_fixtures import TINY_QWEN3, build_tiny_zimage_folder
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "models" / "shapes" / "tokenizer")
    build_tiny_zimage_folder(folder, tokenizer, qwen3=dict(TINY_QWEN3, vocab_size=len(tokenizer)))
    index = json.loads((folder / "model_index.json").read_text())
    index["_zimagekit_defaults"] = TEACHER_DEFAULTS
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def test_lesson_notebook_runs_without_a_cell_error(tmp_path, monkeypatch):
    if not (SHIPPED_MODELS / "shapes-teacher" / "model_index.json").is_file():
        monkeypatch.setenv("ZIMAGEKIT_LESSON_TEACHER", str(tiny_teacher(tmp_path / "shapes-teacher")))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # Raises CellExecutionError, with the cell and its traceback, on the first failing cell.
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()


def test_committed_notebook_carries_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)
