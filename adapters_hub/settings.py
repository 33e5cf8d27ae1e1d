"""Where lisa-hub keeps things, and the service defaults. One place, read from the env.

LISA_HUB_HOME        state folder (model cache, MLflow db + artifacts, pids, logs); ~/.lisa-hub
LISA_HUB_DATA_DIR    offline data mirror (layout of ../shared/data); unset = use the HF hub
LISA_HUB_STORAGE     where Ray Train keeps runs and checkpoints: a folder every node sees, or
                     s3:// / gs:// (pyarrow filesystems); default LISA_HUB_HOME/train (node-local)
MLFLOW_TRACKING_URI  MLflow server; default http://127.0.0.1:5000
RAY_ADDRESS          Ray cluster; default the local head (dashboard http://127.0.0.1:8265)
RAY_AUTH_MODE        token (what `lisa-hub up` starts, and manifests run) | disabled (`--no-auth`)
RAY_AUTH_TOKEN       Ray's token (else RAY_AUTH_TOKEN_PATH, else the stack's LISA_HUB_HOME/ray_auth_token)
MLFLOW_TRACKING_USERNAME  MLflow basic-auth user (else the stack's LISA_HUB_HOME/mlflow_credentials,
MLFLOW_TRACKING_PASSWORD  written by `lisa-hub up --mlflow-auth`); MLflow's client reads both
MLFLOW_AUTH_ADMIN_USERNAME  the MLflow server's admin (its basic-auth app makes it on the first start)
MLFLOW_AUTH_ADMIN_PASSWORD  ... and its password (`up --mlflow-auth` sets both from the stack's user)
MLFLOW_AUTH_CONFIG_PATH  the basic-auth app's ini (its user database; LISA_HUB_HOME/mlflow_auth.ini)
MLFLOW_FLASK_SERVER_SECRET_KEY  the basic-auth app's CSRF key
LISA_HUB_API_KEY     the key `lisa-hub serve` asks every caller for (Authorization: Bearer KEY)
"""

from __future__ import annotations

import os
from pathlib import Path

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


def train_storage() -> str:
    """Ray Train's storage_path: LISA_HUB_STORAGE, else the node-local LISA_HUB_HOME/train."""
    value = os.environ.get("LISA_HUB_STORAGE", "").strip()
    if value:
        return value if "://" in value else str(Path(value).expanduser())
    path = home() / "train"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def train_storage_is_shared() -> bool:
    """Did the user name a storage location (a shared folder or a URI)? The default is node-local."""
    return bool(os.environ.get("LISA_HUB_STORAGE", "").strip())


def data_dir() -> Path | None:
    value = os.environ.get("LISA_HUB_DATA_DIR")
    return Path(value).expanduser() if value else None


def mlflow_uri() -> str:
    """The tracking server; its credentials are in os.environ after this call when the
    local stack runs MLflow with basic auth (`use_mlflow_credentials`)."""
    use_mlflow_credentials()
    return os.environ.get("MLFLOW_TRACKING_URI", f"http://{MLFLOW_HOST}:{MLFLOW_PORT}")


def mlflow_credentials_path(state: Path | None = None) -> Path:
    """Where `lisa-hub up --mlflow-auth` keeps the MLflow user of this stack (JSON, mode 0600)."""
    return (state or home()) / "mlflow_credentials"


def mlflow_credentials(state: Path | None = None) -> dict[str, str] | None:
    """{"username", "password", "secret_key"} of this stack's MLflow basic auth, or None."""
    import json

    path = mlflow_credentials_path(state)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def use_mlflow_credentials(state: Path | None = None) -> None:
    """Export this stack's MLflow user as MLFLOW_TRACKING_USERNAME/PASSWORD (what MLflow's
    client sends as basic auth), unless the user set their own."""
    if os.environ.get("MLFLOW_TRACKING_USERNAME"):
        return
    creds = mlflow_credentials(state)
    if creds:
        os.environ["MLFLOW_TRACKING_USERNAME"] = creds["username"]
        os.environ["MLFLOW_TRACKING_PASSWORD"] = creds["password"]


def ray_auth_headers() -> dict[str, str]:
    """The Authorization header Ray's token authentication expects, when a token exists
    (Ray >= 2.59 turns token auth on for local clusters and keeps the token in
    ~/.ray/auth_token); harmless for a cluster without authentication."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    if not token and path.is_file():
        token = path.read_text(encoding="utf-8").strip()
    return {"Authorization": f"Bearer {token}"} if token else {}
