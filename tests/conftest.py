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


# --------------------------------------------------------------------------- real services
# One stack home for the whole session: `mlflow_server` starts MLflow only; `ray_stack`
# adds the Ray head to the same home (up() is idempotent per service). Free ports, so a
# developer's own `lisa-hub up` on the default ports is left alone.

@pytest.fixture(scope="session")
def stack_home(tmp_path_factory):
    from adapters_hub import stack

    home = tmp_path_factory.mktemp("lisa-hub-home")
    ports = stack.Ports(dashboard=stack.free_port(), gcs=stack.free_port(), mlflow=stack.free_port())
    yield home, ports
    stack.down(home=home)


@pytest.fixture(scope="session")
def mlflow_server(stack_home):
    """Tracking URI of a real MLflow server (SQLite registry) for this test session."""
    from adapters_hub import stack

    home, ports = stack_home
    stack.up(home=home, ray=False, ports=ports)
    uri = stack.mlflow_url(home)
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="session")
def ray_stack(stack_home, mlflow_server):
    """(home, dashboard URL, MLflow URI) of a real local Ray head + MLflow server."""
    from adapters_hub import stack

    home, ports = stack_home
    stack.up(home=home, ports=ports)
    return home, stack.dashboard_url(home), mlflow_server


@pytest.fixture
def own_mlflow(tmp_path_factory, monkeypatch):
    """Tracking URI of an MLflow server of the test's own (the session's registry belongs to
    the ordered e2e tests); jobs submitted by the test get it through MLFLOW_TRACKING_URI."""
    from adapters_hub import stack

    home = tmp_path_factory.mktemp("own-mlflow")
    ports = stack.Ports(dashboard=stack.free_port(), gcs=stack.free_port(), mlflow=stack.free_port())
    stack.up(home=home, ray=False, ports=ports)
    uri = stack.mlflow_url(home)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    yield uri
    stack.down(home=home)
