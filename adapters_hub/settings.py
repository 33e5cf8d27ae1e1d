"""Where lisa-hub keeps things, and the service defaults. One place, read from the env.

LISA_HUB_HOME        state folder (model cache, MLflow db + artifacts, pids, logs); ~/.lisa-hub
LISA_HUB_DATA_DIR    offline data mirror (layout of ../shared/data); unset = use the HF hub
MLFLOW_TRACKING_URI  MLflow server; default http://127.0.0.1:5000
RAY_ADDRESS          Ray cluster; default the local head (dashboard http://127.0.0.1:8265)
"""

from __future__ import annotations

import os
from pathlib import Path

RAY_DASHBOARD_HOST = "127.0.0.1"
RAY_DASHBOARD_PORT = 8265
RAY_GCS_PORT = 6379
MLFLOW_HOST = "127.0.0.1"
MLFLOW_PORT = 5000


def home() -> Path:
    """The state folder, created on first use."""
    path = Path(os.environ.get("LISA_HUB_HOME", Path.home() / ".lisa-hub")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir(*parts: str) -> Path:
    path = home().joinpath("cache", *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir() -> Path | None:
    value = os.environ.get("LISA_HUB_DATA_DIR")
    return Path(value).expanduser() if value else None


def mlflow_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", f"http://{MLFLOW_HOST}:{MLFLOW_PORT}")


def ray_dashboard_url() -> str:
    """HTTP address of the Ray dashboard / job API (what JobSubmissionClient takes)."""
    address = os.environ.get("RAY_ADDRESS", "")
    if address.startswith("http"):
        return address.rstrip("/")
    return f"http://{RAY_DASHBOARD_HOST}:{RAY_DASHBOARD_PORT}"
