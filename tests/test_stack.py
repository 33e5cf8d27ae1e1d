"""The local stack for real: `lisa-hub up` starts Ray (dashboard) and MLflow, `down` stops them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import psutil
import pytest
import requests

from adapters_hub import stack

pytestmark = pytest.mark.stack


def _cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdk.cli", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_up_status_down_through_the_cli(tmp_path):
    env = dict(os.environ, LISA_HUB_HOME=str(tmp_path))
    ports = [str(stack.free_port()) for _ in range(3)]
    flags = ["--dashboard-port", ports[0], "--ray-port", ports[1], "--mlflow-port", ports[2]]
    started = _cli("up", *flags, env=env)
    try:
        assert started.returncode == 0, started.stderr + started.stdout
        dash, mlflow = f"http://127.0.0.1:{ports[0]}", f"http://127.0.0.1:{ports[2]}"
        assert dash in started.stdout and mlflow in started.stdout

        # Ray dashboard API (token auth: lisa-hub's token): a live cluster.
        auth = {"Authorization": f"Bearer {stack.ray_token_path(tmp_path).read_text().strip()}"}
        assert requests.get(f"{dash}/api/version", timeout=5, headers=auth).json()["ray_version"]
        assert requests.get(dash, timeout=5).status_code == 200  # the dashboard page (it asks for the token)

        # MLflow REST API: create and read back a registered model in the SQLite registry.
        api = f"{mlflow}/api/2.0/mlflow/registered-models"
        created = requests.post(f"{api}/create", json={"name": "smoke-model"}, timeout=10)
        assert created.ok, created.text
        got = requests.get(f"{api}/get", params={"name": "smoke-model"}, timeout=10).json()
        assert got["registered_model"]["name"] == "smoke-model"
        assert (tmp_path / "mlflow.db").exists()

        again = _cli("up", *flags, env=env)  # idempotent: same pids, no error
        assert again.returncode == 0, again.stderr
        state = stack._load_state(tmp_path)
        assert all(f"pid {rec.pid}" in again.stdout for rec in state.values())

        healthy = _cli("status", env=env)
        assert healthy.returncode == 0 and healthy.stdout.count("healthy") == 2
        assert "token auth on" in healthy.stdout

        # Token auth by default: the token file is the user's alone, the job API refuses a
        # caller without it (401) or with another (403) and answers with it.
        token_file = stack.ray_token_path(tmp_path)
        assert token_file.stat().st_mode & 0o777 == 0o600
        token = token_file.read_text().strip()
        assert requests.get(f"{dash}/api/version", timeout=5).status_code == 401
        assert requests.get(f"{dash}/api/jobs/", timeout=5).status_code == 401
        assert requests.get(f"{dash}/api/jobs/", timeout=5, headers={"Authorization": "Bearer x" * 8}).status_code == 403
        assert requests.get(f"{dash}/api/jobs/", timeout=5, headers={"Authorization": f"Bearer {token}"}).ok
        # ... and so does the GCS: a driver with another token cannot connect, one with it can
        gcs = state["ray"].extra["gcs_address"]
        probe = "import ray; ray.init(address='%s'); print('nodes', len(ray.nodes()))" % gcs
        clean = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
        wrong = subprocess.run([sys.executable, "-c", probe], env={**clean, "RAY_AUTH_MODE": "token",
                               "RAY_AUTH_TOKEN": "0" * 64}, capture_output=True, text=True, timeout=120)
        assert wrong.returncode != 0 and "nodes" not in wrong.stdout
        right = subprocess.run([sys.executable, "-c", probe], env={**clean, **stack.ray_client_env(tmp_path)},
                               capture_output=True, text=True, timeout=120)
        assert right.returncode == 0 and "nodes 1" in right.stdout, right.stderr[-2000:]
        # Every port reachable from other hosts refuses a caller without the token: an HTTP
        # port answers 401 (except the read-only Prometheus metrics that Ray's autoscaler,
        # dashboard and agents serve on all interfaces); the GCS and the raylet refuse an RPC.
        outside = [addr for _, _, addr in stack.listening(home=tmp_path) if not stack.is_loopback(addr)]
        refusing_rpc = 0
        for addr in outside:
            host, port = addr.rsplit(":", 1)
            host = host.removeprefix("::ffff:")
            host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
            try:
                r = requests.get(f"http://{host}:{port}/", timeout=1)
            except requests.RequestException:  # not HTTP (a gRPC server waits for its HTTP/2 preface)
                refusing_rpc += _grpc_refuses_without_token(host, int(port), token)
                continue
            metrics = r.ok and r.headers.get("content-type", "").startswith("text/plain") and r.text.startswith("# HELP")
            assert r.status_code == 401 or metrics, (addr, r.status_code, r.text[:200])
        assert refusing_rpc >= 2, outside  # the GCS and the raylet's node manager at least
    finally:
        pids = [rec.pid for rec in stack._load_state(tmp_path).values()]
        members = [p for p in psutil.process_iter() if stack._pgid(p.pid) in pids]
        stopped = _cli("down", env=env)
    assert stopped.returncode == 0 and "ray" in stopped.stdout and "mlflow" in stopped.stdout
    assert members and not [p for p in members if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for port in (ports[0], ports[2]):
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}", timeout=2)
    after = _cli("status", env=env)
    assert after.returncode == 1 and after.stdout.count("DOWN") == 2


def test_mlflow_auth_refuses_anonymous_writes_and_lisa_hub_sends_its_user(tmp_path, monkeypatch):
    from adapters_hub import registry, settings

    monkeypatch.setenv("LISA_HUB_HOME", str(tmp_path))
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, "")  # recorded, so that what the test exports is undone after it
        monkeypatch.delenv(name)
    port = stack.free_port()
    try:
        stack.up(home=tmp_path, ray=False, mlflow_auth=True, ports=stack.Ports(mlflow=port))
        url = f"http://127.0.0.1:{port}"
        creds_file = settings.mlflow_credentials_path(tmp_path)
        assert creds_file.stat().st_mode & 0o777 == 0o600
        creds = settings.mlflow_credentials(tmp_path)
        api = f"{url}/api/2.0/mlflow/registered-models/create"
        assert requests.get(f"{url}/health", timeout=5).ok  # the health check stays open
        assert requests.post(api, json={"name": "anonymous"}, timeout=10).status_code == 401
        assert requests.post(api, json={"name": "wrong"}, timeout=10,
                             auth=(creds["username"], "not-the-password")).status_code == 401
        # lisa-hub's own client sends the stack's user: it can write
        reg = registry.Registry(tracking_uri=url)
        reg.client().create_registered_model("by-lisa-hub")
        assert reg.client().get_registered_model("by-lisa-hub").name == "by-lisa-hub"
        assert "basic auth on" in stack.status(home=tmp_path)[1].detail
        # ... and so do the Ray nodes it would start (their jobs and Serve replicas inherit it)
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
        env = stack._ray_env(tmp_path, url, auth=False)
        assert (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]) == (
            creds["username"], creds["password"])
    finally:
        stack.down(home=tmp_path)


_RAY_RPCS = ("/ray.rpc.NodeInfoGcsService/GetAllNodeInfo", "/ray.rpc.NodeManagerService/GetNodeStats",
             "/ray.rpc.CoreWorkerService/NumPendingTasks")  # GCS, raylet, a worker: an empty request is valid


def _grpc_refuses_without_token(host: str, port: int, token: str) -> bool:
    """A Ray gRPC server there answers one of its RPCs with the token and refuses it without."""
    import grpc

    for method in _RAY_RPCS:
        codes = []
        for metadata in (None, [("authorization", f"Bearer {token}")]):
            with grpc.insecure_channel(f"{host}:{port}") as channel:
                call = channel.unary_unary(method, request_serializer=bytes, response_deserializer=bytes)
                try:
                    call(b"", timeout=3, metadata=metadata)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as err:
                    codes.append(err.code())
        if codes[0] == grpc.StatusCode.UNAUTHENTICATED and codes[1] not in (
                grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAVAILABLE):
            return True
    return False


def test_port_taken_by_someone_else_is_a_clear_error(tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(stack.StackError, match=f"port {port} .*already taken.*--mlflow-port"):
            stack.up(home=tmp_path, ray=False, ports=stack.Ports(mlflow=port))
    assert stack.status(home=tmp_path)[1].pid is None  # nothing was started or recorded


def test_down_leaves_foreign_processes_alone(tmp_path):
    # A recorded pid whose start time differs (pid reuse) must not be signalled.
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        state = {"mlflow": stack._Record(pid=bystander.pid, create_time=1.0, port=1)}
        stack._save_state(tmp_path, state)
        assert stack.down(home=tmp_path) == []
        assert bystander.poll() is None
    finally:
        bystander.kill()
