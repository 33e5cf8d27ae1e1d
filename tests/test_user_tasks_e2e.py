"""Tasks of one's own through the real stack: a JSONL, a CSV and a local HF dataset folder,
each submitted with `sdk.submit_adaptation(spec=...)` (spec and data travel in the job's
working_dir), trained with the smoke profile and registered with the data recorded (MLflow
dataset inputs with digest and source; the version's spec_sha256 tag).

Registers into an MLflow server of its own: the session registry belongs to the e2e tests."""

from __future__ import annotations

import csv
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


def test_user_tasks_from_jsonl_csv_and_an_hf_folder_train_and_register_with_their_data(ray_stack, own_mlflow,
                                                                                       tmp_path):
    import datasets
    import mlflow

    import sdk
    from adapters_hub import registry

    _, dashboard, _ = ray_stack
    made = {}
    folder = tmp_path / "jsonl"
    folder.mkdir()
    made["tickets-jsonl"] = _spec(folder, "tickets-jsonl", {"loader": "files", "train": "seed.jsonl",
                                                            "eval_fraction": 0.25})[0]
    folder = tmp_path / "csv"
    folder.mkdir()
    spec, rows = _spec(folder, "tickets-csv", {"loader": "files", "train": "data/train.csv", "eval": "data/eval.csv"})
    (folder / "data").mkdir()
    for name, part in (("train.csv", rows[:18]), ("eval.csv", rows[18:])):
        with (folder / "data" / name).open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(part)
    made["tickets-csv"] = spec
    folder = tmp_path / "hf"
    folder.mkdir()
    spec, rows = _spec(folder, "tickets-hf", {"loader": "hf", "hf_id": "tickets_dataset", "train_split": "train",
                                              "eval_split": "validation"})
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:18]),
                          "validation": datasets.Dataset.from_list(rows[18:])}).save_to_disk(str(folder / "tickets_dataset"))
    made["tickets-hf"] = spec

    jobs = {name: sdk.submit_adaptation(spec=path, address=dashboard, base_model="tiny-llama", profile="smoke")
            for name, path in made.items()}
    client = mlflow.MlflowClient(own_mlflow)
    for name, job in jobs.items():
        result = job.wait(timeout=900)
        assert result.model_name == f"{name}-lisa" and "champion" in result.aliases
        assert {"adapter.accuracy", "adapter.macro_f1", "base.accuracy"} <= set(result.metrics)
        version = registry.get_adapter(f"{name}-lisa@champion", tracking_uri=own_mlflow)
        assert len(version.tags["spec_sha256"]) == 64
        inputs = client.get_run(result.run_id).inputs.dataset_inputs
        contexts = {i.tags[0].value: i.dataset for i in inputs}
        assert set(contexts) == {"training", "evaluation"}
        assert all(d.digest and d.source for d in contexts.values())
