"""A registered adapter version is an MLflow model: `mlflow.pyfunc.load_model("models:/...")`
predicts what lisa-hub generates, `mlflow models serve` answers /invocations, and the base
weights stay out of the registry."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest
import requests
import torch

from adapters_hub import stack
from adapters_hub.backbone import dense_plan, load_lisa_model
from adapters_hub.kinds import get_kind
from adapters_hub.registry import Registry
from adapters_hub.task_eval import generate

pytestmark = pytest.mark.stack

PROMPTS = ["Question: What is 2 + 3?\nAnswer:", "Question: Name a colour.\nAnswer:"]


@pytest.fixture(scope="module")
def registered(mlflow_server, tmp_path_factory):
    """(ref, in-process completions) of a dense-backbone LoRA adapter registered for real."""
    tmp = tmp_path_factory.mktemp("pyfunc")
    lm, tok = load_lisa_model("tiny-llama", dense_plan("tiny-llama"))
    kind = get_kind("lora")
    kind.add(lm, "t", {"r": 4, "lora_alpha": 8})
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    lm.eval()
    base_out = generate(lm, tok, PROMPTS, max_new_tokens=6, batch_size=2, progress=False)
    kind.activate(lm, "t")
    expected = generate(lm, tok, PROMPTS, max_new_tokens=6, batch_size=2, progress=False)
    assert expected != base_out  # the adapter changes the completions: a dropped adapter would show
    kind.save(lm, "t", tmp / "adapter")
    (tmp / "adapter" / "README.md").write_text("# a test adapter\nLoad it with mlflow.pyfunc.load_model.\n")
    reg = Registry(mlflow_server)
    client = reg.client()
    exp = client.get_experiment_by_name("pyfunc-tests") or client.get_experiment(client.create_experiment("pyfunc-tests"))
    run_id = client.create_run(exp.experiment_id).info.run_id
    task = f"p{uuid.uuid4().hex[:8]}"
    done = reg.register_adapter(run_id=run_id, adapter_dir=tmp / "adapter", task=task, kind="lora", base="tiny-llama",
                                base_fingerprint=lm.base_fingerprint, plan_hash=lm.plan.hash, attention="dense",
                                metrics={"answer_nll": 1.0}, main_metric="answer_nll", higher_is_better=False,
                                trainable_params=1)
    return f"models:/{done.name}@champion", expected, reg, done


def test_pyfunc_load_model_of_a_model_version_predicts_what_lisa_hub_generates(registered):
    import mlflow

    ref, expected, reg, done = registered
    model = mlflow.pyfunc.load_model(ref)
    assert model.predict(PROMPTS, params={"max_new_tokens": 6}) == expected
    # adapter-only: the version holds the adapter and MLflow's files, never the base weights
    mv = reg.client().get_model_version(done.name, str(done.version))
    local = reg.resolve(f"{done.name}/{done.version}")
    assert (local / "lisa_hub.json").is_file() and (local.parents[1] / "MLmodel").is_file()
    size = sum(p.stat().st_size for p in local.parents[1].rglob("*") if p.is_file())
    assert size < 2 * (local / "adapter_model.safetensors").stat().st_size + 200_000
    assert "# a test adapter" in mv.description  # the model card on the model version page


def test_mlflow_models_serve_answers_invocations(registered, mlflow_server):
    ref, expected, _, _ = registered
    port = stack.free_port()
    mlflow_bin = os.path.join(os.path.dirname(sys.executable), "mlflow")
    server = subprocess.Popen([mlflow_bin, "models", "serve", "-m", ref, "--env-manager", "local", "-p", str(port),
                               "-h", "127.0.0.1"], env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server,  # it runs uvicorn by name
                                                        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            assert server.poll() is None, server.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "mlflow models serve did not answer /ping"
            time.sleep(1)
        r = requests.post(f"http://127.0.0.1:{port}/invocations", timeout=120,
                          json={"inputs": PROMPTS, "params": {"max_new_tokens": 6}})
        assert r.ok, r.text
        assert r.json()["predictions"] == expected
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def test_lisa_hub_eval_scores_a_registered_adapter_and_logs_to_its_run(registered, mlflow_server, tmp_path, capsys):
    import json

    from adapters_hub import harness
    from sdk.cli import main

    ref, _, reg, done = registered
    rows = [{"question": f"What is {a} plus {b}?", "answer": f"#### {a + b}"} for a, b in ((2, 3), (7, 1), (4, 4))]
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = harness.write_gsm8k_tasks(tmp_path / "tasks", tmp_path / "g.jsonl")
    code = main(["eval", "--base", "tiny-llama", "--attention", "dense", "--adapter", f"{done.name}/{done.version}",
                 "--tasks", "lisa_gsm8k_mc", "--include-path", str(tasks)])
    assert code == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    acc = line["results"]["lisa_gsm8k_mc"]["acc,none"]
    mv = reg.client().get_model_version(done.name, str(done.version))
    assert line["adapter"] == f"{done.name}/{done.version}" and line["run_id"] == mv.run_id
    assert reg.client().get_run(mv.run_id).data.metrics["lm_eval.lisa_gsm8k_mc.acc"] == acc
    assert main(["eval", "--base", "tiny-llama", "--attention", "dense", "--tasks", " "]) == 2  # one clear line
