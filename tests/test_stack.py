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
