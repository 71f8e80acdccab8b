"""examples/z_image_lesson.ipynb runs top to bottom without a cell error on the shipped shapes
models (teacher and Turbo student), so it never rots."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "z_image_lesson.ipynb"


def test_lesson_notebook_runs_without_a_cell_error(tmp_path, monkeypatch):
    for name in ("ZIMAGEKIT_LESSON_TEACHER", "ZIMAGEKIT_LESSON_TURBO"):
        monkeypatch.delenv(name, raising=False)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # Raises CellExecutionError, with the cell and its traceback, on the first failing cell.
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()


def test_committed_notebook_carries_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)
