"""The conversion job end to end on tiny-llama with a real Ray head and MLflow server:
a killed conversion resumes from its checkpoint and registers backbone-<base> with its
general adapter and healing (tests/test_demo.py trains an adapter on such a backbone).

It registers into an MLflow server of its own: the session's registry belongs to the
ordered e2e tests, which expect tiny-llama's plain backbone and empty adapter models."""

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
ARGS = ["--base", "tiny-llama", "--fraction", "0.5", "--minutes", "10", "--max-steps", "60", "--save-every", "3",
        "--eval-blocks", "2", "--eval-len", "64", "--calib-blocks", "8", "--init-steps", "5",
        "--sensitivity-steps", "3", "--batch-size", "2", "--seq-len", "64"]


def _convert(extra, env, *, kill_after_checkpoint=False):
    """Run the job; with kill_after_checkpoint, SIGKILL it once Ray Train has recorded a
    checkpoint of the run (its checkpoint-manager snapshot lists one)."""
    from tests.test_e2e import _checkpoint_recorded

    proc = subprocess.Popen([sys.executable, "-m", "jobs.convert", *ARGS, *extra], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    deadline = time.monotonic() + 600
    for line in proc.stdout:
        lines.append(line)
        if kill_after_checkpoint and _checkpoint_recorded(Path(env["LISA_HUB_HOME"]) / "train", "convert-"):
            os.killpg(proc.pid, signal.SIGKILL)
            break
        assert time.monotonic() < deadline, "".join(lines[-40:])
    proc.wait(timeout=120)
    return proc.returncode, "".join(lines)


def test_killed_conversion_resumes_and_registers_the_healed_backbone(ray_stack, own_mlflow, tmp_path):
    home = ray_stack[0]
    mlflow_uri = own_mlflow
    from adapters_hub import stack

    env = {**os.environ, "RAY_ADDRESS": stack._load_state(home)["ray"].extra["gcs_address"],
           "MLFLOW_TRACKING_URI": mlflow_uri, "LISA_HUB_HOME": str(tmp_path / "home")}
    rc, first = _convert(["--register"], env, kill_after_checkpoint=True)
    assert rc != 0 and "LISA_HUB_RESULT" not in first

    rc, second = _convert(["--register"], env)
    assert rc == 0, second[-4000:]
    assert "resuming from checkpoint at step" in second, second[-4000:]
    step = int(second.split("resuming from checkpoint at step")[1].split()[0])
    assert 3 <= step < 60
    result = json.loads(second.split("LISA_HUB_RESULT ")[1].splitlines()[0])
    assert result["model_name"] == "backbone-tiny-llama" and result["metrics"]["steps"] == 60
    assert not (tmp_path / "home" / "train" / "convert").exists()

    from adapters_hub.backbone import backbone_folder, general_adapter_of, healing_of

    folder = backbone_folder("tiny-llama", tracking_uri=mlflow_uri)
    assert general_adapter_of(folder) is not None
    assert healing_of(folder) is not None  # healed by default: the deltas travel with the backbone
    assert (folder / "healing" / "healing.safetensors").stat().st_size < 2_000_000
    assert json.loads((folder / "plan.json").read_text())["hash"] == result["plan_hash"]
    assert len(json.loads((folder / "local_init.json").read_text())) == len(result["layers"])
