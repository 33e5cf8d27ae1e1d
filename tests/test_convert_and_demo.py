"""The conversion job and `lisa-hub demo` end to end on tiny-llama with a real Ray head and
an MLflow server of this module's own (the session's registry belongs to the ordered e2e
tests, which expect tiny-llama's plain backbone and empty adapter models).

A conversion run in-process (`python -m jobs.convert`) is killed once Ray Train has
recorded a checkpoint; the same spec submitted through `sdk.submit_conversion` (what the
demo does on a registry without a converted backbone) resumes from that checkpoint and
registers backbone-<base> with its general adapter and healing. The demo then finds that
backbone registered, adapts GSM8K on it, answers through the OpenAI-compatible server and
prints base / backbone / adapter side by side. (Each job costs about a minute of CI, so the
demo does not convert a second time here; that it converts on a fresh registry is the one
`general_adapter_of(folder) is None` branch of `sdk.cli._demo`, which calls the
`submit_conversion` exercised here.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.stack, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
# ConvertSpec fields of the test's conversion: the job's flags and the SDK's options say the same
SPEC = {"fraction": 0.5, "minutes": 10, "max_steps": 24, "save_every": 4, "eval_blocks": 2, "eval_len": 64,
        "calib_blocks": 8, "init_steps": 5, "sensitivity_steps": 3, "batch_size": 2, "seq_len": 64}


def _flags(spec: dict) -> list[str]:
    return [part for key, value in spec.items() for part in (f"--{key.replace('_', '-')}", str(value))]


@pytest.fixture(scope="module")
def registry_and_storage(ray_stack, tmp_path_factory):
    """(MLflow URI of this module's own server, shared run storage) in os.environ, where the
    SDK passes both on to the jobs it submits."""
    from adapters_hub import stack

    home = tmp_path_factory.mktemp("convert-mlflow")
    ports = stack.Ports(dashboard=stack.free_port(), gcs=stack.free_port(), mlflow=stack.free_port())
    stack.up(home=home, ray=False, ports=ports)
    storage = tmp_path_factory.mktemp("convert-storage")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", stack.mlflow_url(home))
        mp.setenv("LISA_HUB_STORAGE", str(storage))
        yield stack.mlflow_url(home), storage
    stack.down(home=home)


def _kill_after_checkpoint(env: dict, storage: Path) -> tuple[int, str]:
    """Run the conversion in-process; SIGKILL it once Ray Train has recorded a checkpoint
    of the run (its checkpoint-manager snapshot lists one)."""
    from tests.test_e2e import _checkpoint_recorded

    proc = subprocess.Popen([sys.executable, "-m", "jobs.convert", "--base", "tiny-llama", *_flags(SPEC), "--register"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    deadline = time.monotonic() + 600
    for line in proc.stdout:
        lines.append(line)
        if _checkpoint_recorded(storage, "convert-"):
            os.killpg(proc.pid, signal.SIGKILL)
            break
        assert time.monotonic() < deadline, "".join(lines[-40:])
    proc.wait(timeout=120)
    return proc.returncode, "".join(lines)


@pytest.fixture(scope="module")
def converted(ray_stack, registry_and_storage, tmp_path_factory):
    """(ConversionJob, ConversionResult) of the resumed conversion."""
    import sdk
    from adapters_hub import stack

    home, dashboard, _ = ray_stack
    _, storage = registry_and_storage
    env = {**os.environ, "RAY_ADDRESS": stack._load_state(home)["ray"].extra["gcs_address"],
           "LISA_HUB_HOME": str(tmp_path_factory.mktemp("convert-home"))}
    rc, first = _kill_after_checkpoint(env, storage)
    assert rc != 0 and "LISA_HUB_RESULT" not in first

    options = {k: v for k, v in SPEC.items() if k not in ("fraction", "minutes")}
    job = sdk.submit_conversion(base_model="tiny-llama", fraction=SPEC["fraction"], minutes=SPEC["minutes"],
                                options=options, address=dashboard)
    return job, job.wait(timeout=900)


def test_a_killed_conversion_resumes_through_the_sdk_and_registers_the_healed_backbone(converted,
                                                                                       registry_and_storage):
    from adapters_hub.backbone import backbone_folder, general_adapter_of, healing_of

    job, result = converted
    mlflow_uri, storage = registry_and_storage
    logs = job.logs()
    assert "resuming from checkpoint at step" in logs, logs[-4000:]
    step = int(logs.split("resuming from checkpoint at step")[1].split()[0])
    assert 3 <= step < SPEC["max_steps"]
    assert result.model_name == "backbone-tiny-llama" and result.metrics["steps"] == SPEC["max_steps"]
    assert not [p for p in storage.glob("convert-*") if p.is_dir()], "the finished run's folder is left"

    folder = backbone_folder("tiny-llama", tracking_uri=mlflow_uri)
    assert general_adapter_of(folder) is not None
    assert healing_of(folder) is not None  # healed by default: the deltas travel with the backbone
    assert (folder / "healing" / "healing.safetensors").stat().st_size < 2_000_000
    assert json.loads((folder / "plan.json").read_text())["hash"] == result.plan_hash
    assert len(json.loads((folder / "local_init.json").read_text())) == len(result.layers)


def test_demo_adapts_on_the_converted_backbone_serves_and_compares(converted, ray_stack, registry_and_storage):
    from adapters_hub import stack

    home = ray_stack[0]
    port = stack.free_port()
    env = {**os.environ, "LISA_HUB_HOME": str(home)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "sdk.cli", "demo", "--base", "tiny-llama", "--profile", "smoke",
                           "--port", str(port)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    for step in ("== 2. using the registered converted backbone of tiny-llama", "== 3. adapt gsm8k",
                 "== 4. one request", "== 5. what was gained"):
        assert step in out, out[-5000:]
    assert "init=general adapter (healed backbone)" in out  # the adapter trained on the converted backbone
    table = out.split("== 5.")[1]
    for row in ("base (dense)", "LiSA backbone (converted, healed)", "+ gsm8k adapter (gsm8k-lisa/"):
        assert row in table
    assert "backbone perplexity" in table  # the conversion's metrics, read from the registered folder
    answer = out.split("== 4.")[1].split("\n")[1]
    assert answer.strip().startswith("gsm8k-lisa/")  # the server answered (what a random model says is noise)
