"""The notebooks in ``notebooks/`` run end to end (quick mode) and are stored without outputs.

Each notebook is executed with nbclient on the ``python3`` kernel (ipykernel, from the
``dev`` extra) with ``RECSYS_QUICK=1``; any cell that raises fails the test. Full mode
(``RECSYS_QUICK`` unset) is run by hand, see ``notebooks/README.md``.

    python tests/test_notebooks.py --clear     # strip outputs from every notebook before committing
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
# Quick mode should stay well inside this; it only guards against a hung kernel.
CELL_TIMEOUT_S = 600


def _ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


def test_there_are_notebooks() -> None:
    assert PATHS, f"no notebooks in {NOTEBOOKS}"


@pytest.mark.parametrize("path", PATHS, ids=_ids(PATHS))
def test_stored_without_outputs(path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [n for n, cell in enumerate(nb.cells) if cell.cell_type == "code"
             and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: cells {dirty} have outputs or execution counts; clear them "
                       f"(python tests/test_notebooks.py --clear) before committing")


@pytest.mark.integration
@pytest.mark.notebook
@pytest.mark.parametrize("path", PATHS, ids=_ids(PATHS))
def test_notebook_runs_in_quick_mode(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import require_ml100k  # imported here so the module also runs as a script

    require_ml100k()
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    # The kernel inherits this process's environment: quick mode, and one thread per
    # library, since pytest -n 2 runs two notebooks (or a notebook and other tests) at once.
    monkeypatch.setenv("RECSYS_QUICK", "1")
    # the kernel runs in notebooks/: a relative data home (the README's ../shared/data) must
    # be made absolute first
    if os.environ.get("RECSYS_DATA"):
        monkeypatch.setenv("RECSYS_DATA", str(Path(os.environ["RECSYS_DATA"]).resolve()))
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        monkeypatch.setenv(var, "1")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError naming the cell when one raises
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors


def clear_outputs(paths: list[Path]) -> list[Path]:
    """Strip outputs and execution counts in place; returns the notebooks that changed."""
    import nbformat

    changed = []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        dirty = False
        for cell in nb.cells:
            if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None):
                cell.outputs, cell.execution_count, dirty = [], None, True
            if cell.get("metadata", {}).pop("execution", None) is not None:
                dirty = True
        if dirty:
            nbformat.write(nb, path)
            changed.append(path)
    return changed


if __name__ == "__main__":
    if sys.argv[1:] != ["--clear"]:
        sys.exit(f"usage: python {os.path.relpath(__file__)} --clear")
    for p in clear_outputs(PATHS):
        print(f"cleared {p}")
