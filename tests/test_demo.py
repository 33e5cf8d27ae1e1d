"""`lisa-hub demo` end to end on tiny-llama against a real Ray head and an MLflow server of
its own: it converts (and heals) the backbone first, adapts GSM8K on it, answers through
the OpenAI-compatible server it starts, and prints base / backbone / adapter side by side.
(That a second demo reuses the registered converted backbone is one condition in
`sdk.cli._demo`; it is not run twice here, to keep CI short.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.stack, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


def test_demo_converts_adapts_serves_and_compares_on_a_fresh_registry(ray_stack, own_mlflow):
    from adapters_hub import stack
    from adapters_hub.backbone import backbone_folder, general_adapter_of, healing_of

    home, _, _ = ray_stack
    port = stack.free_port()
    env = {**os.environ, "LISA_HUB_HOME": str(home), "MLFLOW_TRACKING_URI": own_mlflow}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "sdk.cli", "demo", "--base", "tiny-llama", "--profile",
                           "smoke", "--convert-minutes", "0.5", "--convert-max-steps", "6", "--port", str(port)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    for step in ("== 2. convert tiny-llama", "== 3. adapt gsm8k", "== 4. one request", "== 5. what was gained"):
        assert step in out, out[-5000:]
    assert "init=general adapter (healed backbone)" in out  # the adapter trained on the converted backbone
    table = out.split("== 5.")[1]
    for row in ("base (dense)", "LiSA backbone (converted, healed)", "+ gsm8k adapter (gsm8k-lisa/"):
        assert row in table
    answer = out.split("== 4.")[1].split("\n")[1]
    assert answer.strip().startswith("gsm8k-lisa/")  # the server answered (what a random model says is noise)

    folder = backbone_folder("tiny-llama", tracking_uri=own_mlflow)
    assert general_adapter_of(folder) is not None and healing_of(folder) is not None
