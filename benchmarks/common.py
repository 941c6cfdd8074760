"""What the benchmark scripts share: where the MNIST files are."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def data_dir() -> str:
    """``CL_DATA_DIR``, else the shared data next to the repository, else ``./data`` (downloaded there)."""
    for candidate in (os.environ.get("CL_DATA_DIR"), REPO.parent / "shared" / "data", REPO / "data"):
        if candidate and (Path(candidate) / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
            return str(candidate)
    return "./data"
