"""Local stack: a real Ray head node (with its dashboard) and a real MLflow tracking server.

  lisa-hub up       start both (idempotent), wait until both answer, print their URLs
  lisa-hub up --nodes 2   the head plus a second Ray node (its own raylet) joined to it
  lisa-hub status   health of each service, and every port the stack listens on
  lisa-hub down     stop exactly what `up` started: the recorded process groups and their
                    descendants (job drivers and workers), nothing else

Each runs as a child process group of its own (start_new_session), recorded with its
start time in LISA_HUB_HOME/run/stack.json, so `down` never touches a process it did not
start, even when a pid was reused. Addresses we choose are 127.0.0.1; Ray 2.60 still binds
some gRPC ports to all interfaces (`lisa-hub status` shows which).

    Ray head      `ray start --head --block`      dashboard + job API on :8265, GCS on :6379
    MLflow        `mlflow server` (uvicorn)       :5000, SQLite registry LISA_HUB_HOME/mlflow.db,
                                                  artifacts proxied from LISA_HUB_HOME/mlartifacts

The Ray head gets MLFLOW_TRACKING_URI, LISA_HUB_HOME and LISA_HUB_DATA_DIR in its
environment, so jobs it runs log to this MLflow server and read the same data mirror.

Ray runs with token authentication (RAY_AUTH_MODE=token): every node, the dashboard, the
job API and the GCS ask for one token, LISA_HUB_HOME/ray_auth_token (mode 0600, made by
the first `up`), or the user's RAY_AUTH_TOKEN. Drivers of this stack get it from
`use_ray_auth` (the SDK, the CLI, jobs.runtime, the test fixtures); jobs and workers from
the raylet's environment; a browser asks for it once. `up(auth=False)` (`--no-auth`)
turns it off, with a warning: Ray binds some of its ports on every interface.

MLflow answers anyone on loopback unless `up(mlflow_auth=True)` (`--mlflow-auth`) runs its
basic-auth app: every request but /health then needs this stack's user (made once, kept in
LISA_HUB_HOME/mlflow_credentials, mode 0600, or the user's MLFLOW_TRACKING_USERNAME/
PASSWORD); this process, Ray's nodes and so every job and replica send it
(settings.use_mlflow_credentials).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from adapters_hub import settings


class StackError(RuntimeError):
    """A local service could not be started, reached or stopped; the message says why."""


@dataclass
class Ports:
    dashboard: int = settings.RAY_DASHBOARD_PORT
    gcs: int = settings.RAY_GCS_PORT
    mlflow: int = settings.MLFLOW_PORT


@dataclass
class ServiceStatus:
    name: str
    url: str
    healthy: bool
    pid: int | None = None
    detail: str = ""

    def line(self) -> str:
        state = "healthy" if self.healthy else "DOWN"
        pid = f" pid {self.pid}" if self.pid else ""
        return f"{self.name:7s} {state:8s} {self.url}{pid}  {self.detail}".rstrip()


@dataclass
class _Record:  # one started service, as kept in stack.json
    pid: int
    create_time: float
    port: int
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- public API


def up(*, home: Path | None = None, ray: bool = True, mlflow: bool = True,
       ports: Ports | None = None, nodes: int = 1, timeout: float = 180.0, auth: bool = True,
       mlflow_auth: bool = False) -> list[ServiceStatus]:
    """Start the services that are not running yet and wait until they answer.

    `nodes` > 1 adds nodes-1 Ray nodes to the head (`add_nodes`): separate raylets, as on a
    cluster, the machine's CPUs split between them. `auth` (default) starts Ray with token
    authentication; this process then uses the token (`use_ray_auth`). `mlflow_auth` runs
    MLflow with its basic-auth app: every request but /health needs the stack's user
    (LISA_HUB_HOME/mlflow_credentials, or the user's MLFLOW_TRACKING_USERNAME/PASSWORD),
    which this process, Ray's nodes and so every job and replica then send.

    >>> for s in up(): print(s.line())   # doctest: +SKIP
    ray     healthy  http://127.0.0.1:8265 pid 1234
    mlflow  healthy  http://127.0.0.1:5000 pid 1240
    """
    home = Path(home) if home else settings.home()
    ports = ports or Ports()
    state = _load_state(home)
    started = []
    cpus_per_node = max(1, (os.cpu_count() or 1) // nodes)  # with nodes > 1, the machine's CPUs split
    if mlflow and not _alive(state.get("mlflow")):
        _require_free(ports.mlflow, "MLflow", "--mlflow-port")
        state["mlflow"] = _start_mlflow(home, ports.mlflow, auth=mlflow_auth)
        started.append("mlflow")
    elif mlflow and mlflow_auth and state["mlflow"].extra.get("auth") != "basic":
        raise StackError("the running MLflow server has no auth; `lisa-hub down` first to start it with --mlflow-auth")
    if ray and not _alive(state.get("ray")):
        _require_free(ports.dashboard, "the Ray dashboard", "--dashboard-port")
        _require_free(ports.gcs, "the Ray GCS", "--ray-port")
        mlflow_port = state["mlflow"].port if state.get("mlflow") else ports.mlflow
        state["ray"] = _start_ray(home, ports, f"http://127.0.0.1:{mlflow_port}",
                                  num_cpus=cpus_per_node if nodes > 1 else None,
                                  shared_storage=nodes > 1, auth=auth)
        state["ray"].extra["nodes"] = nodes
        started.append("ray")
    elif ray and nodes != state["ray"].extra.get("nodes", 1):
        raise StackError(f"the running stack has {state['ray'].extra.get('nodes', 1)} Ray node(s); "
                         f"`lisa-hub down` first to start it with {nodes}")
    _save_state(home, state)
    if ray:
        use_ray_auth(home)
    if mlflow_auth:
        settings.use_mlflow_credentials(home)

    deadline = time.monotonic() + timeout
    while True:
        report = status(home=home)
        wanted = [s for s in report if (s.name == "ray" and ray) or (s.name == "mlflow" and mlflow)]
        if all(s.healthy for s in wanted):
            have = sum(1 for k in _load_state(home) if k.startswith("ray-node-"))
            if ray and nodes > 1 and have < nodes - 1:
                add_nodes(nodes - 1 - have, home=home, num_cpus=cpus_per_node)
            return report
        for name in started:  # a service that died while starting: say so at once
            if not _alive(state[name]):
                raise StackError(f"{name} exited while starting; see {_log_path(home, name)}:\n"
                                 + _tail(_log_path(home, name)))
        if time.monotonic() > deadline:
            raise StackError("services did not become healthy in time: "
                             + "; ".join(s.line() for s in wanted))
        time.sleep(1.0)


def add_nodes(n: int, *, home: Path | None = None, num_cpus: int = 1, timeout: float = 120.0) -> list[str]:
    """Join `n` more Ray nodes (each its own raylet, `num_cpus` CPUs) to this stack's head;
    returns their state names ("ray-node-1", ...). `down` stops them with the head.

    Nodes on one machine share its filesystem, so their jobs may keep run checkpoints in
    LISA_HUB_HOME/train: the head was started with LISA_HUB_STORAGE pointing there when
    `up(nodes=...)` started it; otherwise set LISA_HUB_STORAGE for the jobs."""
    home = Path(home) if home else settings.home()
    state = _load_state(home)
    head = state.get("ray")
    if not _alive(head):
        raise StackError("no Ray head runs in this stack: `lisa-hub up` first")
    existing = [k for k in state if k.startswith("ray-node-")]
    names = []
    for i in range(len(existing) + 1, len(existing) + n + 1):
        name = f"ray-node-{i}"
        env = _ray_env(home, mlflow_url(home), auth=head.extra.get("auth", "disabled") == "token",
                       user_token=head.extra.get("token") == "RAY_AUTH_TOKEN")
        # A temp dir of its own: nodes on one machine would otherwise share the session's
        # runtime_resources, and one node's agent deletes a job's working_dir that a
        # process on the other node still runs in. Short, for the socket paths under it.
        temp = tempfile.mkdtemp(prefix="ray-n", dir="/tmp")
        argv = [_bin("ray"), "start", "--block", "--address", head.extra["gcs_address"], "--temp-dir", temp,
                "--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus),
                "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port()),
                "--object-store-memory", str(256 * 1024**2), "--disable-usage-stats"]
        state[name] = _spawn(home, name, argv, env)
        state[name].extra["temp_dir"] = temp
        names.append(name)
    _save_state(home, state)
    want = len(existing) + n + 1
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            alive = _alive_nodes(home)
        except Exception:  # the GCS not answering yet
            alive = 0
        if alive >= want:
            return names
        for name in names:
            if not _alive(state[name]):
                raise StackError(f"{name} exited while starting; see {_log_path(home, name)}:\n"
                                 + _tail(_log_path(home, name)))
        time.sleep(1.0)
    raise StackError(f"only {alive} of {want} Ray nodes joined in {timeout:.0f} s")


def remove_nodes(*, home: Path | None = None, timeout: float = 60.0) -> list[str]:
    """Stop the nodes `add_nodes` joined (the head stays) and wait until the cluster has
    marked them dead; returns what was stopped."""
    home = Path(home) if home else settings.home()
    state = _load_state(home)
    stopped = []
    for name in sorted(k for k in state if k.startswith("ray-node-")):
        rec = state.pop(name)
        if _alive(rec):
            _terminate_group(rec.pid, 15.0)
            stopped.append(name)
        if rec.extra.get("temp_dir"):
            shutil.rmtree(rec.extra["temp_dir"], ignore_errors=True)
    _save_state(home, state)
    head = state.get("ray")
    deadline = time.monotonic() + timeout
    while stopped and _alive(head) and time.monotonic() < deadline:
        if _alive_nodes(home) <= 1:
            break
        time.sleep(1.0)
    return stopped


def _alive_nodes(home: Path) -> int:
    """Alive nodes of the cluster, asked of the dashboard's state API over HTTP (the `ray
    list nodes` CLI it replaces started a Python process per poll: seconds each)."""
    import requests

    url = (f"{dashboard_url(home)}/api/v0/nodes?limit=10000&filter_keys=state&filter_predicates=%3D"
           "&filter_values=ALIVE")
    resp = requests.get(url, timeout=30, headers=_ray_headers(home))
    if not resp.ok:
        raise StackError(f"{url}: HTTP {resp.status_code} {resp.text[:300]}")
    return len(resp.json()["data"]["result"]["result"])


def status(*, home: Path | None = None) -> list[ServiceStatus]:
    """Health of each service recorded in this LISA_HUB_HOME (answering HTTP = healthy)."""
    home = Path(home) if home else settings.home()
    state = _load_state(home)
    out = []
    for name, path in (("ray", "/api/version"), ("mlflow", "/health")):
        rec = state.get(name)
        port = rec.port if rec else {"ray": settings.RAY_DASHBOARD_PORT, "mlflow": settings.MLFLOW_PORT}[name]
        url = f"http://127.0.0.1:{port}"
        ok, detail = _http_ok(url + path, _ray_headers(home) if name == "ray" else None)
        pid = rec.pid if rec and _alive(rec) else None
        if rec is None:
            detail = "not started by lisa-hub" + (" (but something answers there)" if ok else "")
        elif pid is None:
            detail, ok = "recorded process is gone", False
        elif name == "ray":
            detail = (f"token auth on (token: {_token_source(home)})" if rec.extra.get("auth") == "token"
                      else "token auth OFF (--no-auth): anyone who reaches this machine can run code") + (
                          f"; {detail}" if detail else "")
        elif name == "mlflow":
            detail = (f"basic auth on (user: {_mlflow_user_source(home)})" if rec.extra.get("auth") == "basic"
                      else "no auth: loopback only (--mlflow-auth asks every caller for a user)") + (
                          f"; {detail}" if detail else "")
        out.append(ServiceStatus(name, url, ok, pid, detail))
    return out


def down(*, home: Path | None = None, timeout: float = 15.0) -> list[str]:
    """Stop the process groups `up` started (SIGTERM, then SIGKILL); returns what was stopped."""
    home = Path(home) if home else settings.home()
    state = _load_state(home)
    stopped = []
    extra_nodes = sorted(k for k in state if k.startswith("ray-node-"))
    for name in (*extra_nodes, "ray", "mlflow"):  # ray first: its jobs may still log to MLflow
        rec = state.pop(name, None)
        if rec is None or not _alive(rec):
            continue
        _terminate_group(rec.pid, timeout)
        stopped.append(f"{name} (pid {rec.pid})")
        if rec.extra.get("temp_dir"):
            shutil.rmtree(rec.extra["temp_dir"], ignore_errors=True)
        if name == "ray" and rec.extra.get("gcs_address"):
            forget_current_cluster(rec.extra["gcs_address"])
    _save_state(home, state)
    return stopped


RAY_CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")  # where Ray notes the last head it started


def forget_current_cluster(gcs_address: str, path: Path = RAY_CURRENT_CLUSTER) -> bool:
    """Remove Ray's current-cluster note when it names the head we stopped (same GCS port):
    left behind, a later driver's plain `ray.init()` "connects to the existing cluster" there
    and retries for minutes. Returns whether it was removed."""
    try:
        noted = path.read_text().strip()
    except OSError:
        return False
    if noted.rpartition(":")[2] != gcs_address.rpartition(":")[2]:
        return False  # another cluster's note: not ours to remove
    path.unlink(missing_ok=True)
    return True


def mlflow_url(home: Path | None = None) -> str:
    """URL of the MLflow server this stack runs (or the default)."""
    rec = _load_state(Path(home) if home else settings.home()).get("mlflow")
    return f"http://127.0.0.1:{rec.port if rec else settings.MLFLOW_PORT}"


def dashboard_url(home: Path | None = None) -> str:
    rec = _load_state(Path(home) if home else settings.home()).get("ray")
    return f"http://127.0.0.1:{rec.port if rec else settings.RAY_DASHBOARD_PORT}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Environment of every Ray worker the stack (or a submitted job) starts. Ray Train patches
# `print` in its workers to log every call as well; that prints our lines twice, and prints
# what libraries deliberately capture (the bytecode disassembly `datasets` makes while
# fingerprinting TRL's map functions). Plain stdout is what the job log needs.
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def ray_token_path(home: Path | None = None) -> Path:
    """Where `up` keeps this stack's Ray token (unless the user gives RAY_AUTH_TOKEN)."""
    return (Path(home) if home else settings.home()) / "ray_auth_token"


def ray_client_env(home: Path | None = None) -> dict[str, str]:
    """The environment a Ray client of this stack's head needs: RAY_AUTH_MODE and where the
    token is ({} when no head is recorded)."""
    head = _load_state(Path(home) if home else settings.home()).get("ray")
    if head is None:
        return {}
    if head.extra.get("auth") != "token":
        return {"RAY_AUTH_MODE": "disabled"}
    if head.extra.get("token") == "RAY_AUTH_TOKEN":  # the user's own token: their environment has it
        return {"RAY_AUTH_MODE": "token"}
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(ray_token_path(home))}


def use_ray_auth(home: Path | None = None) -> None:
    """Make this process a client of this stack's Ray head: its auth mode and token in
    os.environ (so child processes inherit them) and in Ray's own cached config."""
    env = ray_client_env(home)
    stale = ("RAY_AUTH_TOKEN" in os.environ) if "RAY_AUTH_TOKEN_PATH" in env else False
    if not env or (all(os.environ.get(k) == v for k, v in env.items()) and not stale):
        return
    os.environ.update(env)
    if "RAY_AUTH_TOKEN_PATH" in env:
        os.environ.pop("RAY_AUTH_TOKEN", None)  # it would win over the head's token file
    if env["RAY_AUTH_MODE"] == "disabled":
        os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    try:  # Ray caches the mode and the token per process; refresh both (ray._private's own way)
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except ImportError:
        pass


def head_gcs_address(home: Path | None = None) -> str | None:
    """The 127.0.0.1 GCS address of this stack's Ray head when it runs, else None (drivers
    connect through jobs.runtime.connect)."""
    head = _load_state(Path(home) if home else settings.home()).get("ray")
    return head.extra["gcs_address"] if _alive(head) else None


# ----------------------------------------------------------------------------- starting


def _bin(name: str) -> str:
    # The console scripts of the environment lisa-hub runs in (the repo's .venv).
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _spawn(home: Path, name: str, argv: list[str], env: dict) -> _Record:
    log = _log_path(home, name)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        fh.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=home, start_new_session=True)  # own process group
    import psutil

    return _Record(pid=proc.pid, create_time=psutil.Process(proc.pid).create_time(), port=0)


def _start_mlflow(home: Path, port: int, *, auth: bool = False) -> _Record:
    (home / "mlartifacts").mkdir(parents=True, exist_ok=True)
    argv = [_bin("mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
            "--artifacts-destination", str(home / "mlartifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # MLflow's own job runner (7 huey workers) serves features lisa-hub does not use.
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    if auth:  # MLflow's basic-auth app: its users in mlflow_auth.db, this stack's admin its first user
        creds = _ensure_mlflow_credentials(home)
        config = home / "mlflow_auth.ini"
        config.write_text("[mlflow]\ndefault_permission = READ\n"
                          f"database_uri = sqlite:///{home / 'mlflow_auth.db'}\n"
                          "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        argv += ["--app-name", "basic-auth"]
        env.update(MLFLOW_AUTH_CONFIG_PATH=str(config), MLFLOW_AUTH_ADMIN_USERNAME=creds["username"],
                   MLFLOW_AUTH_ADMIN_PASSWORD=creds["password"], MLFLOW_FLASK_SERVER_SECRET_KEY=creds["secret_key"])
    rec = _spawn(home, "mlflow", argv, env)
    rec.port = port
    rec.extra = {"auth": "basic" if auth else "none"}
    return rec


def _ensure_mlflow_credentials(home: Path) -> dict[str, str]:
    """This stack's MLflow user (file mode 0600): the user's MLFLOW_TRACKING_USERNAME/PASSWORD
    when set, else `lisa-hub` with a random password; kept, because MLflow creates its
    admin user once, on the first start."""
    import json
    import secrets

    path = settings.mlflow_credentials_path(home)
    creds = settings.mlflow_credentials(home) or {}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        if creds and (creds["username"], creds["password"]) != (user, password) and (home / "mlflow_auth.db").exists():
            raise StackError(f"MLFLOW_TRACKING_USERNAME/PASSWORD differ from the MLflow user this stack made "
                             f"first ({path}); MLflow keeps its first admin: unset them, or remove "
                             f"{home / 'mlflow_auth.db'} and {path} to start over")
        creds.update(username=user, password=password, source="MLFLOW_TRACKING_USERNAME")
    elif not creds:
        creds = {"username": "lisa-hub", "password": secrets.token_urlsafe(24), "source": "file"}
    creds.setdefault("secret_key", secrets.token_hex(32))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(creds, fh)
    os.chmod(path, 0o600)
    return creds


def _mlflow_user_source(home: Path) -> str:
    creds = settings.mlflow_credentials(home) or {}
    where = "MLFLOW_TRACKING_USERNAME" if creds.get("source") == "MLFLOW_TRACKING_USERNAME" else str(
        settings.mlflow_credentials_path(home))
    return f"{creds.get('username', '?')} from {where}"


def _ray_env(home: Path, mlflow_uri: str, *, shared_storage: bool = False, auth: bool = True,
             user_token: bool | None = None) -> dict:
    """Environment of the Ray processes the stack starts (and so of its jobs and workers)."""
    env = dict(os.environ)
    creds = settings.mlflow_credentials(home)
    if creds and "MLFLOW_TRACKING_USERNAME" not in env:  # --mlflow-auth: jobs and replicas send the user
        env.update(MLFLOW_TRACKING_USERNAME=creds["username"], MLFLOW_TRACKING_PASSWORD=creds["password"])
    env.update(MLFLOW_TRACKING_URI=os.environ.get("MLFLOW_TRACKING_URI", mlflow_uri),
               LISA_HUB_HOME=str(home), RAY_USAGE_STATS_ENABLED="0")
    # Jobs run `python -m jobs.adapt` with the Python of the node: this environment's.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    # A job's working_dir package is kept in the GCS only 600 s past its upload by default;
    # a resubmit of unchanged code then skips the upload and its Ray Train workers fail to
    # fetch a deleted package (ray-project/ray#46625, seen here). Keep packages for a day.
    env.setdefault("RAY_RUNTIME_ENV_TEMPORARY_REFERENCE_EXPIRATION_S", "86400")
    # Token auth on every node (and so on every job and worker, which inherit it); said
    # explicitly either way: Ray >= 2.59 picks a mode of its own when RAY_AUTH_MODE is unset.
    env["RAY_AUTH_MODE"] = "token" if auth else "disabled"
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    if user_token is None:  # a new head: the user's RAY_AUTH_TOKEN, else this stack's token file
        user_token = bool(env.get("RAY_AUTH_TOKEN", "").strip())
    if auth and not user_token:
        env.pop("RAY_AUTH_TOKEN", None)
        env["RAY_AUTH_TOKEN_PATH"] = str(_ensure_token(home))
    env.update(WORKER_ENV)
    if shared_storage:  # nodes of one machine share its disk: run checkpoints may stay in the home
        env.setdefault("LISA_HUB_STORAGE", str(home / "train"))
    return env


def _start_ray(home: Path, ports: Ports, mlflow_uri: str, *, num_cpus: int | None = None,
               shared_storage: bool = False, auth: bool = True) -> _Record:
    env = _ray_env(home, mlflow_uri, shared_storage=shared_storage, auth=auth)
    argv = [_bin("ray"), "start", "--head", "--block",
            "--node-ip-address", "127.0.0.1",
            "--port", str(ports.gcs),
            "--include-dashboard", "true",
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(ports.dashboard),
            # Side ports Ray would otherwise fix (52365, 10001, ...): free ones, so that a
            # second stack (tests) can run beside a developer's.
            "--dashboard-agent-listen-port", str(free_port()),
            "--ray-client-server-port", str(free_port()),
            "--object-store-memory", str(512 * 1024**2),
            "--disable-usage-stats"] + (["--num-cpus", str(num_cpus)] if num_cpus else [])
    rec = _spawn(home, "ray", argv, env)
    rec.port = ports.dashboard
    rec.extra = {"gcs_port": ports.gcs, "gcs_address": f"127.0.0.1:{ports.gcs}",
                 "auth": "token" if auth else "disabled",
                 "token": "RAY_AUTH_TOKEN" if "RAY_AUTH_TOKEN_PATH" not in env else "file"}
    return rec


def _ensure_token(home: Path) -> Path:
    """This stack's Ray token file (0600), created once with a random token."""
    import secrets

    path = ray_token_path(home)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    os.chmod(path, 0o600)
    return path


def _token_source(home: Path) -> str:
    head = _load_state(home).get("ray")
    return "RAY_AUTH_TOKEN" if head and head.extra.get("token") == "RAY_AUTH_TOKEN" else str(ray_token_path(home))


def _ray_headers(home: Path) -> dict[str, str]:
    """The Authorization header of this stack's Ray token ({} without auth)."""
    env = ray_client_env(home)
    if env.get("RAY_AUTH_MODE") != "token":
        return settings.ray_auth_headers()
    if "RAY_AUTH_TOKEN_PATH" in env:
        path = Path(env["RAY_AUTH_TOKEN_PATH"])
        token = path.read_text().strip() if path.is_file() else ""
    else:
        token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


# ----------------------------------------------------------------------------- helpers


def _require_free(port: int, what: str, flag: str) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise StackError(
                f"port {port} for {what} is already taken by another program (not started by "
                f"lisa-hub in {settings.home()}); stop it or choose another port with {flag}"
            ) from None


def _alive(rec: _Record | None) -> bool:
    if rec is None:
        return False
    import psutil

    try:
        proc = psutil.Process(rec.pid)
        # Same pid AND same start time: the process we started, not a reused pid.
        return abs(proc.create_time() - rec.create_time) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _terminate_group(pid: int, timeout: float) -> None:
    """SIGTERM the process group and every descendant (Ray starts job drivers and workers
    in sessions of their own: outside the group, they would outlive the head for a minute
    or more, holding ports); SIGKILL what is left after `timeout`."""
    import psutil

    try:
        members = _group_and_descendants(pid)
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for proc in members:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(members, timeout=timeout)
    for proc in alive:  # stragglers of our own group only
        try:
            proc.kill()
        except psutil.Error:
            pass


def _group_and_descendants(pgid: int) -> list:
    """The processes of a started service: its process group, and every descendant (Ray
    starts job drivers and workers in sessions of their own)."""
    import psutil

    members = [p for p in psutil.process_iter(["pid"]) if _pgid(p.pid) == pgid]
    for proc in list(members):
        try:
            members += [c for c in proc.children(recursive=True) if c not in members]
        except psutil.Error:
            pass
    return members


def listening(*, home: Path | None = None) -> list[tuple[str, str, str]]:
    """(service, process name, "address:port") of every TCP port the stack's processes listen
    on, so a user sees what the stack exposes (`lisa-hub status`)."""
    import psutil

    home = Path(home) if home else settings.home()
    out = []
    for name, rec in sorted(_load_state(home).items()):
        if not _alive(rec):
            continue
        for proc in _group_and_descendants(rec.pid):
            try:
                conns = proc.net_connections(kind="tcp")
                pname = proc.name()
            except psutil.Error:
                continue
            for c in conns:
                if c.status == psutil.CONN_LISTEN:
                    out.append((name, pname, f"{c.laddr.ip}:{c.laddr.port}"))
    return sorted(set(out))


def is_loopback(address: str) -> bool:
    import ipaddress

    host = address.rsplit(":", 1)[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost"
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _http_ok(url: str, headers: dict[str, str] | None = None) -> tuple[bool, str]:
    import requests

    try:
        resp = requests.get(url, timeout=2, headers=headers or {})
        return resp.ok, "" if resp.ok else f"HTTP {resp.status_code}"
    except requests.RequestException as err:
        return False, f"no answer ({err.__class__.__name__})"


def _state_path(home: Path) -> Path:
    return home / "run" / "stack.json"


def _log_path(home: Path, name: str) -> Path:
    return home / "logs" / f"{name}.log"


def _load_state(home: Path) -> dict[str, _Record]:
    path = _state_path(home)
    if not path.exists():
        return {}
    raw = json.loads(path.read_text())
    return {name: _Record(**rec) for name, rec in raw.items()}


def _save_state(home: Path, state: dict[str, _Record]) -> None:
    path = _state_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({k: asdict(v) for k, v in state.items()}, indent=2))
    tmp.replace(path)


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# ----------------------------------------------------------------------------- CLI


def add_commands(sub) -> None:
    p = sub.add_parser("up", help="start the local Ray head (dashboard) and MLflow server")
    p.add_argument("--no-ray", action="store_true", help="start MLflow only")
    p.add_argument("--no-mlflow", action="store_true", help="start Ray only")
    p.add_argument("--dashboard-port", type=int, default=settings.RAY_DASHBOARD_PORT)
    p.add_argument("--ray-port", type=int, default=settings.RAY_GCS_PORT)
    p.add_argument("--mlflow-port", type=int, default=settings.MLFLOW_PORT)
    p.add_argument("--nodes", type=int, default=1,
                   help="Ray nodes (the head + NODES-1 joined raylets, CPUs split between them)")
    p.add_argument("--no-auth", action="store_true",
                   help="start Ray without token authentication (anyone who reaches this machine can run code)")
    p.add_argument("--mlflow-auth", action="store_true",
                   help="run MLflow with its basic-auth app: every caller needs the stack's user "
                        "(LISA_HUB_HOME/mlflow_credentials, or MLFLOW_TRACKING_USERNAME/PASSWORD)")
    p.set_defaults(func=_cmd_up)
    p = sub.add_parser("status", help="health of the local services")
    p.set_defaults(func=_cmd_status)
    p = sub.add_parser("down", help="stop what `lisa-hub up` started")
    p.set_defaults(func=_cmd_down)


def _cmd_up(args) -> int:
    print(f"[lisa-hub] starting the local stack in {settings.home()} (first start takes ~30 s) ...", flush=True)
    if args.nodes < 1:
        raise ValueError("--nodes: at least 1")
    if not args.no_auth and os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        args.no_auth = True  # the user's explicit RAY_AUTH_MODE=disabled means the same
    if args.no_auth:
        print("[lisa-hub] WARNING: --no-auth: Ray starts without token authentication; Ray binds some of its "
              "ports on every interface, so anyone who reaches this machine can submit a job (run code)",
              file=sys.stderr, flush=True)
    report = up(ray=not args.no_ray, mlflow=not args.no_mlflow, nodes=args.nodes, auth=not args.no_auth,
                mlflow_auth=args.mlflow_auth,
                ports=Ports(dashboard=args.dashboard_port, gcs=args.ray_port, mlflow=args.mlflow_port))
    for s in report:
        print(s.line())
    print(f"Ray dashboard: {dashboard_url()}    MLflow UI: {mlflow_url()}")
    if not args.no_ray and ray_client_env().get("RAY_AUTH_MODE") == "token":
        print(f"Ray token auth on: the dashboard asks for the token in {_token_source(settings.home())}; "
              f"lisa-hub commands use it themselves")
    if args.mlflow_auth:
        print(f"MLflow basic auth on: user {_mlflow_user_source(settings.home())}; lisa-hub commands and jobs "
              "send it themselves, a browser asks for it")
    return 0


def _cmd_status(args) -> int:
    report = status()
    for s in report:
        print(s.line())
    ports = listening()
    if ports:
        print("listening:")
        for service, process, address in ports:
            note = "" if is_loopback(address) else "   <- reachable from other hosts"
            print(f"  {service:<10} {process:<22} {address}{note}")
    return 0 if all(s.healthy for s in report) else 1


def _cmd_down(args) -> int:
    stopped = down()
    print("stopped: " + ", ".join(stopped) if stopped else "nothing to stop")
    return 0
