"""Execute ``notebooks/quickstart.ipynb`` top to bottom and save it with its outputs (README "Quick start notebook").

    python scripts/run_notebook.py                 # refresh the committed notebook in place
    python scripts/run_notebook.py --output x.ipynb

Run from anywhere (the notebook changes to the repository root itself). Cells carry no execution timestamps, so a
rerun changes only what the notebook shows. ``jupyter execute notebooks/quickstart.ipynb`` runs it too (same
``nbclient``, in the ``dev`` extra), but stamps every cell with the time.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def execute(notebook: Path = NOTEBOOK, output: Path | None = None, timeout: int = 600) -> Any:
    """Run every cell of ``notebook`` in a fresh ``python3`` kernel (working folder: the notebook's) and write the
    result to ``output`` (default: in place); returns the executed notebook. A failing cell raises."""
    import nbclient
    import nbformat

    executed = nbformat.read(notebook, as_version=4)
    nbclient.NotebookClient(
        executed,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(Path(notebook).parent)}},
    ).execute()
    nbformat.write(executed, output or notebook)
    return executed


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "notebook", nargs="?", type=Path, default=NOTEBOOK, help="notebook to run (default: %(default)s)"
    )
    parser.add_argument("--output", type=Path, default=None, help="where to save it (default: in place)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds a cell may run")
    args = parser.parse_args(argv)
    execute(args.notebook, args.output, args.timeout)


if __name__ == "__main__":
    main()
