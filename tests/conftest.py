"""Shared test set-up: the offline data mirror, an isolated LISA_HUB_HOME per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Tests read ../shared/data when it exists (CI and dev machines); never copied into the repo.
if "LISA_HUB_DATA_DIR" not in os.environ and SHARED_DATA.is_dir():
    os.environ["LISA_HUB_DATA_DIR"] = str(SHARED_DATA)


def needs_data(*relative: str):
    """Skip marker for tests that read files of the offline mirror."""
    root = os.environ.get("LISA_HUB_DATA_DIR")
    ok = root is not None and all((Path(root) / r).is_file() for r in relative)
    return pytest.mark.skipif(not ok, reason=f"offline data mirror lacks {relative}")


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the deterministic tiny LLaMA; do not mutate, copy.deepcopy it."""
    from adapters_hub.models import load_base

    return load_base("tiny-llama")
