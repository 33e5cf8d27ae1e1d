"""A task of one's own through the real stack: a local HF dataset folder submitted with
`sdk.submit_adaptation(spec=...)` (spec and data travel in the job's working_dir), trained
with the smoke profile and registered with the data recorded (MLflow dataset inputs with
digest and source; the version's spec_sha256 tag).

Registers into an MLflow server of its own: the session registry belongs to the e2e tests."""

from __future__ import annotations

import json

import pytest
import yaml

pytestmark = [pytest.mark.stack, pytest.mark.slow]

TICKETS = [("My card was charged twice", "billing"), ("The app crashes on start", "technical"),
           ("How do I change my password", "account"), ("Refund for last month please", "billing"),
           ("Error 500 when I upload", "technical"), ("I cannot log in", "account")]


def _spec(folder, name, dataset):
    from sdk import cli

    rows = [{"text": f"{t} ({i})", "label": lab} for i in range(4) for t, lab in TICKETS]
    (folder / "seed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.main(["task", "init", name, "--data", str(folder / "seed.jsonl")]) == 0  # a starter, then edited
    raw = yaml.safe_load((folder / f"{name}.yaml").read_text())
    raw["dataset"] = dataset
    raw["profiles"]["smoke"].update(max_steps=1, eval_examples=2, train_examples=4)
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    return folder / f"{name}.yaml", rows


def test_a_user_task_from_a_local_hf_folder_trains_and_registers_with_its_data(ray_stack, own_mlflow, tmp_path):
    """One job (each costs a minute of CI): the HF-folder loader, whose data is a folder the
    job's package must carry whole. That JSONL and CSV files are carried too is checked on
    the package itself (tests/test_user_tasks.py); the loaders' rows are unit-tested there."""
    import datasets
    import mlflow

    import sdk
    from adapters_hub import registry

    name = "tickets-hf"
    spec, rows = _spec(tmp_path, name, {"loader": "hf", "hf_id": "tickets_dataset", "train_split": "train",
                                        "eval_split": "validation"})
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:18]),
                          "validation": datasets.Dataset.from_list(rows[18:])}).save_to_disk(str(tmp_path / "tickets_dataset"))

    job = sdk.submit_adaptation(spec=spec, address=ray_stack[1], base_model="tiny-llama", profile="smoke")
    result = job.wait(timeout=900)
    assert result.model_name == f"{name}-lisa" and "champion" in result.aliases
    assert {"adapter.accuracy", "adapter.macro_f1", "base.accuracy"} <= set(result.metrics)
    version = registry.get_adapter(f"{name}-lisa@champion", tracking_uri=own_mlflow)
    assert len(version.tags["spec_sha256"]) == 64
    inputs = mlflow.MlflowClient(own_mlflow).get_run(result.run_id).inputs.dataset_inputs
    contexts = {i.tags[0].value: i.dataset for i in inputs}
    assert set(contexts) == {"training", "evaluation"}
    assert all(d.digest and d.source for d in contexts.values())
