"""Executes the notebooks and saves their tagged figures as PNGs (the README's figures).

A code cell tagged ``figure:NAME`` has its image output written to ``OUT_DIR/NAME.png``.
The notebooks themselves are not modified (they stay committed without outputs).

  python notebooks/export_figures.py docs/figures [notebooks/quickstart.ipynb ...]
"""
from __future__ import annotations

import argparse
import base64
import time
from pathlib import Path

import nbclient
import nbformat

NOTEBOOKS = Path(__file__).resolve().parent
TAG = "figure:"


def execute(path: Path, timeout: int = 600) -> nbformat.NotebookNode:
    """Runs ``path`` top to bottom in a fresh ``python3`` kernel (cwd: its folder)."""
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=timeout,
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    return nb


def tagged_figures(nb: nbformat.NotebookNode) -> dict[str, bytes]:
    """NAME -> PNG bytes of the last image output of every cell tagged ``figure:NAME``."""
    out = {}
    for cell in nb.cells:
        for tag in cell.get("metadata", {}).get("tags", []):
            if not tag.startswith(TAG):
                continue
            images = [o["data"]["image/png"] for o in cell.get("outputs", [])
                      if "image/png" in o.get("data", {})]
            if not images:
                raise ValueError(f"cell tagged {tag!r} produced no image output.")
            out[tag[len(TAG):]] = base64.b64decode(images[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("notebooks", nargs="*", type=Path,
                        default=sorted(NOTEBOOKS.glob("*.ipynb")))
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for path in args.notebooks:
        start = time.perf_counter()
        nb = execute(path)
        print(f"{path.name}: executed in {time.perf_counter() - start:.1f} s")
        for name, png in tagged_figures(nb).items():
            (args.out_dir / f"{name}.png").write_bytes(png)
            print(f"  wrote {args.out_dir / f'{name}.png'} ({len(png) // 1024} KiB)")


if __name__ == "__main__":
    main()
