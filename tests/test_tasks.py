"""Task specs: loading, validation errors that name file and field, extraction, SFT formatting."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from adapters_hub import tasks
from adapters_hub.task_eval import sft_examples
from adapters_hub.tasks import Metric, TaskSpecError, UnknownTaskError, extract_number_after_marker, load_task


def needs_data(*relative: str):
    # like conftest.needs_data (conftest is not importable as a module under pytest 9)
    root = os.environ.get("LISA_HUB_DATA_DIR")
    ok = root is not None and all((Path(root) / r).is_file() for r in relative)
    return pytest.mark.skipif(not ok, reason=f"offline data mirror lacks {relative}")


def test_builtin_specs_load():
    assert {"gsm8k", "wikitext2"} <= set(tasks.list_tasks())
    gsm = load_task("gsm8k")
    assert gsm.main_metric is Metric.accuracy and gsm.higher_is_better
    assert set(gsm.metrics) == {Metric.accuracy, Metric.answer_nll}
    assert gsm.extraction.marker == "####" and gsm.generation.greedy
    assert set(gsm.profiles) == {"smoke", "quick", "full"}
    smoke = gsm.profile("smoke")
    assert smoke.name == "smoke" and smoke.default_base == "tiny-llama" and not smoke.use_gpu
    assert gsm.profile("full").use_gpu
    wiki = load_task("wikitext2")
    assert wiki.main_metric is Metric.perplexity and not wiki.higher_is_better
    with pytest.raises(UnknownTaskError, match="no profile 'huge'.*smoke"):
        gsm.profile("huge")


def test_spec_files_carry_a_run_command():
    for name in ("gsm8k", "wikitext2"):
        text = (tasks.tasks_dir() / f"{name}.yaml").read_text()
        assert f"lisa-hub adapt --task {name}" in text and f"python -m jobs.adapt --task {name}" in text


@pytest.mark.parametrize("name", ["nope", "../gsm8k", "gsm8k.yaml", "/etc/passwd", ""])
def test_unknown_task_lists_known(name):
    with pytest.raises(UnknownTaskError, match="known tasks: gsm8k, wikitext2"):
        load_task(name)


@pytest.fixture
def spec_dir(tmp_path, monkeypatch):
    """A LISA_HUB_TASKS_DIR holding a copy of gsm8k.yaml; returns (folder, spec as a dict)."""
    shutil.copy(tasks.tasks_dir() / "gsm8k.yaml", tmp_path / "gsm8k.yaml")
    monkeypatch.setenv("LISA_HUB_TASKS_DIR", str(tmp_path))
    return tmp_path, yaml.safe_load((tmp_path / "gsm8k.yaml").read_text())


def _write(folder, raw, name="gsm8k"):
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(raw))


def test_tasks_dir_override(spec_dir):
    folder, _ = spec_dir
    assert tasks.list_tasks() == ["gsm8k"]
    assert load_task("gsm8k").source_file == str(folder / "gsm8k.yaml")


def test_bad_yaml_names_file(spec_dir):
    folder, _ = spec_dir
    (folder / "gsm8k.yaml").write_text("name: gsm8k\nmetrics: [accuracy\n")
    with pytest.raises(TaskSpecError, match=r"gsm8k\.yaml: not valid YAML"):
        load_task("gsm8k")


@pytest.mark.parametrize("edit, field, message", [
    (lambda r: r.pop("main_metric"), "main_metric", "Field required"),
    (lambda r: r["profiles"]["quick"].update(lr="fast"), "profiles.quick.lr", "valid number"),
    (lambda r: r["profiles"]["smoke"].update(epochs=3), "profiles.smoke.epochs", "unknown field"),
    (lambda r: r["extraction"].update(kind="bleu"), "extraction.kind", "Input should be"),
    (lambda r: r["extraction"].update(kind="regex"), "extraction", "marker is not used by extraction 'regex'"),
    (lambda r: r.update(extraction={"kind": "regex"}), "extraction", "pattern is required for regex"),
    (lambda r: r["extraction"].update(pattern="(a)(b)"), "extraction", "pattern is not used"),
    (lambda r: r.update(metrics=["accuracy", "bleu"]), "metrics.1", "Input should be"),
    (lambda r: r["dataset"].update(hf_id="someone/else"), "dataset", "differs from adapters_hub.data"),
    (lambda r: r["format"].update(prompt="{question.__class__}"), "format.prompt", "plain field name"),
    (lambda r: r.update(direction="lower"), "(top level)", "direction 'lower' is wrong for accuracy"),
    (lambda r: r.update(tie_breaker="accuracy"), "(top level)", "tie_breaker 'accuracy' must be one of metrics"),
    (lambda r: r.update(tie_breaker="nll"), "tie_breaker", "Input should be"),
    (lambda r: r["profiles"]["quick"].update(batch_size=0), "profiles.quick.batch_size", "greater than 0"),
])
def test_malformed_spec_names_file_and_field(spec_dir, edit, field, message):
    folder, raw = spec_dir
    edit(raw)
    _write(folder, raw)
    with pytest.raises(TaskSpecError) as info:
        load_task("gsm8k")
    text = str(info.value)
    assert str(folder / "gsm8k.yaml") in text
    line = next(line for line in text.splitlines() if line.strip().startswith(field + ":"))
    assert message in line, text


def test_spec_name_must_match_file(spec_dir):
    folder, raw = spec_dir
    raw["name"] = "other"
    _write(folder, raw)
    with pytest.raises(TaskSpecError, match="field 'name' must be 'gsm8k'"):
        load_task("gsm8k")


@pytest.mark.parametrize("text, expected", [
    ("so 9 * 2 = 18\n#### 18", "18"),
    ("#### 1,000", "1000"),
    ("#### $18.00 dollars", "18"),
    ("#### -3.50", "-3.5"),
    ("#### 0.0", "0"),
    ("answer: #### 7\n\nQuestion: ...\n#### 9", "7"),   # the first marker counts
    ("the answer is 18", None),                          # no marker, no answer
    ("#### none", None),
])
def test_extract_number_after_marker(text, expected):
    assert extract_number_after_marker(text, "####") == expected


def test_gsm8k_formatting_and_target():
    spec = load_task("gsm8k")
    row = {"question": "Tom has 2 apples and buys 3. How many?", "answer": "2 + 3 = <<2+3=5>>5 apples.\n#### 5"}
    assert spec.prompt(row) == "Question: Tom has 2 apples and buys 3. How many?\nAnswer:"
    assert spec.completion(row) == " 2 + 3 = 5 apples.\n#### 5"  # calculator annotation stripped
    assert spec.target(row) == "5"
    assert sft_examples(spec, [row]) == [{"prompt": spec.prompt(row), "completion": spec.completion(row)}]
    with pytest.raises(tasks.TaskDataError, match="template field 'question' not in the row"):
        spec.prompt({"answer": "#### 1"})


def test_wikitext_sft_is_plain_text_chunks():
    spec = load_task("wikitext2")
    text = "".join(f" = Heading {i} = \n line {i} of the article .\n" for i in range(50))
    chunks = tasks.chunk_text(text, 100)
    assert "".join(chunks) == text and all(len(c) >= 100 for c in chunks[:-1])
    assert sft_examples(spec, [{"text": c} for c in chunks]) == [{"text": c} for c in chunks]


@needs_data("gsm8k/train.jsonl", "gsm8k/test.jsonl", "wikitext2/test.raw.txt")
def test_load_rows_from_mirror():
    gsm = load_task("gsm8k")
    smoke = gsm.profile("smoke")
    train, test = tasks.load_rows(gsm, "train", smoke), tasks.load_rows(gsm, "eval", smoke)
    assert len(train) == smoke.train_examples and len(test) == smoke.eval_examples
    assert all(gsm.target(row) is not None for row in train + test)

    wiki = load_task("wikitext2")
    profile = wiki.profile("quick")
    train, test = tasks.load_rows(wiki, "train", profile), tasks.load_rows(wiki, "eval", profile)
    assert len(test) == profile.eval_examples and len(train) == profile.train_examples  # quick fits the mirror
    # same split for both: training text comes strictly after the eval text
    assert not {r["text"] for r in train} & {r["text"] for r in test}
