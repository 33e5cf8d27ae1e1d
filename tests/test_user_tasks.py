"""Tasks of one's own: specs from anywhere, JSONL / CSV / Parquet / HF-folder data, chat
format, the answer checks and metrics, `lisa-hub task init | check`, and bad input that
names file, row and field. Tiny data and the tiny model: seconds."""

from __future__ import annotations

import json

import pytest
import yaml

from adapters_hub import tasks
from adapters_hub.tasks import TaskDataError, TaskSpecError, load_task_file
from adapters_hub.tasks import scoring, sources  # noqa: F401  (tasks.sources)

PROFILES = yaml.safe_load("""
smoke: {default_base: tiny-llama, max_steps: 1, train_examples: 8, eval_examples: 4, batch_size: 2,
        eval_batch_size: 4, grad_accum: 1, lr: 1.0e-3, max_seq_len: 128, num_workers: 1, use_gpu: false,
        distill_beta: 0.0, save_steps: 0}
""")
TICKETS = [("My card was charged twice", "billing"), ("The app crashes on start", "technical"),
           ("How do I change my password", "account"), ("Refund for last month please", "billing"),
           ("Error 500 when I upload", "technical"), ("I cannot log in", "account")] * 4


def _classification(folder, *, data="tickets.jsonl", extra=None):
    spec = {"name": "tickets", "description": "support tickets",
            "dataset": {"loader": "files", "train": data, "eval_fraction": 0.25},
            "format": {"prompt": "Ticket: {text}\nLabel:", "answer": " {label}", "target_field": "label"},
            "extraction": {"kind": "label", "labels": ["billing", "technical", "account"]},
            "metrics": ["accuracy", "macro_f1", "answer_nll"], "main_metric": "accuracy", "direction": "higher",
            "generation": {"max_new_tokens": 4, "stop": ["\n"]}, "profiles": PROFILES, **(extra or {})}
    path = folder / "tickets.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_jsonl_task_loads_from_anywhere_and_splits_stably(tmp_path):
    _jsonl(tmp_path / "tickets.jsonl", [{"text": t + f" #{i}", "label": lab} for i, (t, lab) in enumerate(TICKETS)])
    spec = load_task_file(_classification(tmp_path))
    train, evaluation = (tasks.sources.read_rows(spec, p) for p in ("train", "eval"))
    assert len(train) + len(evaluation) == len(TICKETS) and evaluation and train
    assert train[0]["_where"].startswith("tickets.jsonl line ")
    assert spec.prompt(train[0]).startswith("Ticket: ") and spec.completion(train[0]) == f" {train[0]['label']}"
    # stable: adding rows never moves an existing row to the other side
    more = [{"text": f"new ticket {i}", "label": "billing"} for i in range(10)]
    _jsonl(tmp_path / "tickets.jsonl", [{"text": t + f" #{i}", "label": lab} for i, (t, lab) in enumerate(TICKETS)]
           + more)
    again = {r["text"] for r in tasks.sources.read_rows(spec, "eval")}
    assert {r["text"] for r in evaluation} <= again


def test_csv_and_parquet_and_a_local_hf_dataset_folder_give_the_same_rows(tmp_path):
    import csv

    import datasets

    rows = [{"text": t, "label": lab} for t, lab in TICKETS]
    with (tmp_path / "tickets.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "tickets.parquet"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:16]),
                          "test": datasets.Dataset.from_list(rows[16:])}).save_to_disk(str(tmp_path / "hfdata"))
    got = {}
    for name in ("tickets.csv", "tickets.parquet"):
        spec = load_task_file(_classification(tmp_path, data=name))
        got[name] = [{k: r[k] for k in ("text", "label")} for r in tasks.sources.read_rows(spec, "train")]
    assert got["tickets.csv"] == got["tickets.parquet"]
    hf = _classification(tmp_path, extra={"dataset": {"loader": "hf", "hf_id": "hfdata", "train_split": "train",
                                                      "eval_split": "test"}})
    spec = load_task_file(hf)
    assert len(tasks.sources.read_rows(spec, "train")) == 16 and len(tasks.sources.read_rows(spec, "eval")) == 8
    assert tasks.sources.data_files(spec) == [tmp_path / "hfdata"]


@pytest.mark.parametrize("rows, match", [
    ([{"text": "a", "label": "billing"}, {"label": "billing"}], r"tickets.jsonl line 2: field 'text' is missing"),
    ([{"text": "a", "label": "billing"}, {"text": "b", "label": "sales"}],
     r"tickets.jsonl line 2: label='sales' is not one of the labels"),
    ([{"text": "a", "label": "billing"}, {"text": "", "label": "billing"}], r"line 2: field 'text' is missing or empty"),
])
def test_bad_rows_name_file_row_and_field(tmp_path, rows, match):
    _jsonl(tmp_path / "tickets.jsonl", rows * 8)
    spec = load_task_file(_classification(tmp_path))
    with pytest.raises(TaskDataError, match=match):
        tasks.sources.read_rows(spec, "train") + tasks.sources.read_rows(spec, "eval")


def test_bad_specs_and_files_are_clear(tmp_path):
    with pytest.raises(TaskDataError, match="tickets.jsonl does not exist"):
        tasks.sources.read_rows(load_task_file(_classification(tmp_path)), "train")
    (tmp_path / "tickets.jsonl").write_text('{"text": "a", "label": "billing"}\nnot json\n')
    with pytest.raises(TaskDataError, match="tickets.jsonl line 2: not a JSON object"):
        tasks.sources.read_rows(load_task_file(_classification(tmp_path)), "train")
    _jsonl(tmp_path / "tickets.jsonl", [{"text": "a", "label": "billing"}])
    with pytest.raises(TaskDataError, match="eval side of tickets.jsonl has no rows"):
        tasks.sources.read_rows(load_task_file(_classification(tmp_path)), "eval")
    # a placeholder no column provides
    path = _classification(tmp_path, extra={"format": {"prompt": "{subject}: {text}", "answer": " {label}",
                                                       "target_field": "label"}})
    _jsonl(tmp_path / "tickets.jsonl", [{"text": t, "label": lab} for t, lab in TICKETS])
    with pytest.raises(TaskDataError, match="field 'subject' is missing"):
        tasks.sources.read_rows(load_task_file(path), "train")
    # a user's spec may not take a built-in task's name
    raw = yaml.safe_load((tmp_path / "tickets.yaml").read_text())
    (tmp_path / "gsm8k.yaml").write_text(yaml.safe_dump({**raw, "name": "gsm8k"}))
    with pytest.raises(TaskSpecError, match="'gsm8k' is a built-in task"):
        load_task_file(tmp_path / "gsm8k.yaml")
    with pytest.raises(TaskSpecError, match="dataset: .*exactly one of an eval split"):
        load_task_file(_classification(tmp_path, extra={"dataset": {"loader": "files", "train": "tickets.jsonl"}}))
    with pytest.raises(TaskSpecError, match="macro_f1' needs extraction kind 'label'"):
        load_task_file(_classification(tmp_path, extra={"extraction": {"kind": "exact"}}))


@pytest.mark.parametrize("text, labels, expected", [
    ("Billing.", ["billing", "technical"], "billing"),
    (" technical issue, probably", ["billing", "technical"], "technical"),
    ("not spam at all", ["spam", "not spam"], "not spam"),          # the longest label that starts it
    ("I think this is about the account", ["billing", "account"], "account"),
    ("no idea", ["billing", "account"], None),
])
def test_label_matching(text, labels, expected):
    assert scoring.match_label(text, labels) == expected


def test_answer_checks_are_pure_functions():
    assert scoring.normalize("  The  Answer. ") == "answer"
    assert scoring.extract_regex("so the answer is (B).", r"answer is \((\w)\)") == "b"
    assert scoring.first_line("\n Paris.\nand more") == "paris"
    assert scoring.macro_f1(["a", "b", None, "a"], ["a", "a", "b", "a"], labels=["a", "b"]) == pytest.approx(0.4)
    assert scoring.macro_f1(["a", "b"], ["a", "b"], labels=["a", "b"]) == 1.0


def test_multiple_choice_scores_each_choice_by_log_likelihood(tiny, tmp_path):
    from adapters_hub.task_eval import completion_logprobs, evaluate_task

    rows = [{"question": f"{a} + {b} =", "choices": [str(a + b), str(a + b + 1), str(a * b + 7)], "answer": 0}
            for a, b in [(1, 2), (3, 4), (2, 2), (5, 1)]]
    _jsonl(tmp_path / "mc.jsonl", rows)
    spec_path = tmp_path / "mc.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": "sums", "description": "sums", "dataset": {"loader": "files", "train": "mc.jsonl", "eval": "mc.jsonl"},
        "format": {"prompt": "{question}", "choices_field": "choices", "target_field": "answer"},
        "extraction": {"kind": "none"}, "metrics": ["mc_accuracy", "answer_nll"], "main_metric": "mc_accuracy",
        "direction": "higher", "generation": {"max_new_tokens": 4}, "profiles": PROFILES}))
    spec = load_task_file(spec_path)
    assert spec.completion(rows[0]) == " 3"  # the right choice is what trains
    model, tok = tiny
    rows = tasks.sources.read_rows(spec, "eval")
    metrics = evaluate_task(model, tok, spec, rows, profile="smoke", progress=False)
    right = 0
    for row in rows:  # the same thing by hand
        options, answer = spec.choices(row)
        scores = completion_logprobs(model, tok, [spec.prompt(row)] * len(options), options, batch_size=8,
                                     progress=False)
        right += scores.index(max(scores)) == answer
    assert metrics["mc_accuracy"] == right / len(rows)


def test_classification_metrics_on_a_model(tiny, tmp_path, monkeypatch):
    from adapters_hub import task_eval

    _jsonl(tmp_path / "tickets.jsonl", [{"text": t, "label": lab} for t, lab in TICKETS])
    spec = load_task_file(_classification(tmp_path))
    rows = tasks.sources.read_rows(spec, "eval")
    said = ["billing"] * len(rows)  # a model that always says billing
    monkeypatch.setattr(task_eval, "generate", lambda *a, **k: [f" {s}\n" for s in said])
    metrics = task_eval.evaluate_task(tiny[0], tiny[1], spec, rows, profile="smoke", progress=False)
    targets = [r["label"] for r in rows]
    assert metrics["accuracy"] == sum(t == "billing" for t in targets) / len(rows)
    assert metrics["macro_f1"] == pytest.approx(scoring.macro_f1(said, targets, labels=spec.extraction.labels))


def test_chat_tasks_train_on_the_assistant_turn_only(tiny, tmp_path):
    """TRL's conversational prompt-completion: labels (completion_mask) cover the assistant
    turn and nothing before it."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from adapters_hub.task_eval import sft_examples

    model, tok = tiny
    tok = __import__("copy").deepcopy(tok)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    _jsonl(tmp_path / "tickets.jsonl", [{"text": t, "label": lab} for t, lab in TICKETS])
    path = _classification(tmp_path, extra={"format": {"kind": "chat", "system": "Classify the ticket.",
                                                       "prompt": "{text}", "answer": "{label}",
                                                       "target_field": "label"}})
    spec = load_task_file(path)
    rows = tasks.sources.read_rows(spec, "train")[:4]
    examples = sft_examples(spec, rows)
    assert examples[0]["prompt"][0] == {"role": "system", "content": "Classify the ticket."}
    assert examples[0]["completion"] == [{"role": "assistant", "content": rows[0]["label"]}]
    assert spec.prompt(rows[0], tok).endswith("<|assistant|>")
    with pytest.raises(TaskSpecError, match="chat template"):
        spec.prompt(rows[0], tiny[1])
    trainer = SFTTrainer(model=__import__("copy").deepcopy(model), processing_class=tok,
                         train_dataset=Dataset.from_list(examples),
                         args=SFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, report_to="none",
                                        use_cpu=True, max_length=256, activation_checkpointing=False))
    for row, item in zip(rows, trainer.train_dataset):
        assert "labels" in item, sorted(item)
        trained = tok.decode([t for t, lab in zip(item["input_ids"], item["labels"]) if lab != -100])
        assert trained.startswith(row["label"]) and "Classify" not in trained and row["text"] not in trained


def test_task_init_writes_a_spec_that_checks(tmp_path, capsys):
    from sdk import cli

    _jsonl(tmp_path / "tickets.jsonl", [{"text": t, "label": lab} for t, lab in TICKETS])
    assert cli.main(["task", "init", "tickets", "--data", str(tmp_path / "tickets.jsonl")]) == 0
    spec = load_task_file(tmp_path / "tickets.yaml")
    assert spec.extraction.labels == ["account", "billing", "technical"] and spec.main_metric.value == "accuracy"
    assert cli.main(["task", "check", str(tmp_path / "tickets.yaml")]) == 0
    out = capsys.readouterr().out
    assert "is valid" in out and out.count("--- example") == 3 and "prompt +" in out

    qa = [{"question": f"capital of country {i}?", "answer": f"city {i}"} for i in range(20)]
    _jsonl(tmp_path / "qa.jsonl", qa)
    assert cli.main(["task", "init", "capitals", "--data", str(tmp_path / "qa.jsonl")]) == 0
    assert load_task_file(tmp_path / "capitals.yaml").extraction.kind.value == "exact"
    assert cli.main(["task", "init", "capitals", "--data", str(tmp_path / "qa.jsonl")]) == 2  # exists: not overwritten


def test_submitting_bad_user_data_fails_before_anything_is_submitted(tmp_path):
    import sdk

    _jsonl(tmp_path / "tickets.jsonl", [{"text": t, "label": lab} for t, lab in TICKETS] + [{"text": "x"}])
    path = _classification(tmp_path)
    with pytest.raises(TaskDataError, match="field 'label' is missing"):
        sdk.submit_adaptation(spec=path, profile="smoke", address="http://127.0.0.1:9")
    with pytest.raises(TaskSpecError, match="the spec is task 'tickets', not 'gsm8k'"):
        sdk.submit_adaptation(task="gsm8k", spec=path, address="http://127.0.0.1:9")


def test_a_jobs_package_carries_the_spec_and_its_jsonl_csv_or_hf_folder_data(tmp_path):
    """What `submit_adaptation(spec=...)` ships in the job's working_dir: the spec and every
    data file or folder at its path below the spec's folder (the stack e2e runs one of them)."""
    import csv

    import datasets

    from sdk.client import _task_files

    rows = [{"text": t, "label": lab} for t, lab in TICKETS]
    _jsonl(tmp_path / "tickets.jsonl", rows)
    (tmp_path / "data").mkdir()
    for name, part in (("train.csv", rows[:16]), ("eval.csv", rows[16:])):
        with (tmp_path / "data" / name).open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(part)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:16]),
                          "test": datasets.Dataset.from_list(rows[16:])}).save_to_disk(str(tmp_path / "hfdata"))
    datasets_by_loader = {
        "jsonl": ({}, {"user_tasks/tickets/tickets.jsonl"}),
        "csv": ({"dataset": {"loader": "files", "train": "data/train.csv", "eval": "data/eval.csv"}},
                {"user_tasks/tickets/data/train.csv", "user_tasks/tickets/data/eval.csv"}),
        "hf": ({"dataset": {"loader": "hf", "hf_id": "hfdata", "train_split": "train", "eval_split": "test"}},
               {"user_tasks/tickets/hfdata"}),
    }
    for loader, (extra, data) in datasets_by_loader.items():
        spec = load_task_file(_classification(tmp_path, extra=extra))
        carried = _task_files(spec, spec.profile("smoke"))
        assert set(carried) == {"user_tasks/tickets/tickets.yaml"} | data, loader
        assert all(path.exists() for path in carried.values()), loader
