"""Task specs: typed, validated views of manifests/tasks/<name>.yaml.

A task is data, not code: which dataset (wired to the loaders of adapters_hub.data), how a
row becomes a prompt and an answer, how an answer is read back out of a generation, which
metrics to compute and which one decides the champion, and the training profiles.
Everything a spec can ask for is a *name* from a fixed set (`Extraction`, `Metric`,
`AnswerCleanup`, `DataLoader`): a spec never imports or evaluates anything.

    list_tasks()                    -> ["gsm8k", "wikitext2"]
    spec = load_task("gsm8k")       -> TaskSpec
    spec.profile("quick")           -> Profile
    load_rows(spec, "eval", spec.profile("smoke")) -> list[dict]

Specs live in the repository's manifests/tasks/ folder (beside the package, which is where
an editable install and a Ray job's working_dir both find it); LISA_HUB_TASKS_DIR overrides.
"""

from __future__ import annotations

import os
import re
import string
from decimal import Decimal, InvalidOperation
from enum import Enum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

TASK_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


class UnknownTaskError(LookupError):
    """No spec file of that name; the message lists the known tasks."""


class TaskSpecError(ValueError):
    """A spec file that is not valid YAML or does not match the schema; names file and field."""


# ----------------------------------------------------------------------------- closed name sets


class Extraction(str, Enum):
    final_number_after_marker = "final_number_after_marker"  # GSM8K: "... #### 18"
    none = "none"                                            # language modelling: nothing to extract


class Metric(str, Enum):
    accuracy = "accuracy"        # exact match of the extracted answer
    answer_nll = "answer_nll"    # mean NLL of the answer tokens given the prompt (teacher forced)
    perplexity = "perplexity"    # exp(mean next-token NLL) over token blocks of the eval text

    @property
    def higher_is_better(self) -> bool:
        return self is Metric.accuracy


class AnswerCleanup(str, Enum):
    # GSM8K answers carry calculator annotations "<<16-3-4=9>>" that are not natural text.
    strip_calculator_annotations = "strip_calculator_annotations"


class DataLoader(str, Enum):
    task_rows = "task_rows"  # adapters_hub.data.load_task_rows: one dict per example
    corpus = "corpus"        # adapters_hub.data.load_text: one raw text, cut into chunks here


# ----------------------------------------------------------------------------- schema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetSpec(_Strict):
    loader: DataLoader
    name: str                        # key in adapters_hub.data.TASK_DATA / CORPORA
    hf_id: str                       # checked against adapters_hub.data: one source of truth
    hf_config: str | None = None
    train_split: str
    eval_split: str
    mirror: dict[str, str]           # split -> file under LISA_HUB_DATA_DIR
    # corpus only: raw text is cut at line ends into chunks of about this many characters.
    # When train and eval use the same split, eval takes the first chunks, training the rest.
    chunk_chars: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _matches_data_module(self) -> "DatasetSpec":
        from adapters_hub import data

        table = data.TASK_DATA if self.loader is DataLoader.task_rows else data.CORPORA
        if self.name not in table:
            raise ValueError(f"name {self.name!r} is not a known {self.loader.value} dataset "
                             f"(adapters_hub.data knows {', '.join(table)})")
        source = table[self.name]
        for field, mine, theirs in (("hf_id", self.hf_id, source.hf_path), ("hf_config", self.hf_config, source.hf_config),
                                    ("mirror", self.mirror, source.mirror)):
            if mine != theirs:
                raise ValueError(f"{field} {mine!r} differs from adapters_hub.data ({theirs!r})")
        for field in ("train_split", "eval_split"):
            if getattr(self, field) not in self.mirror:
                raise ValueError(f"{field} {getattr(self, field)!r} is not one of the splits {list(self.mirror)}")
        if (self.loader is DataLoader.corpus) != (self.chunk_chars is not None):
            raise ValueError("chunk_chars is required for corpus datasets and only for them")
        return self


class FormatSpec(_Strict):
    prompt: str                      # str.format template over the row's fields, e.g. "Question: {question}\nAnswer:"
    answer: str                      # the completion the model is trained on, e.g. " {answer}"
    target_field: str                # row field holding the reference answer for extraction
    answer_cleanup: list[AnswerCleanup] = []

    @field_validator("prompt", "answer")
    @classmethod
    def _plain_fields_only(cls, template: str) -> str:
        # Only {name} placeholders: "{x.attr}" / "{x[0]}" would let a spec reach into objects.
        for _, field, _, _ in string.Formatter().parse(template):
            if field is not None and not field.isidentifier():
                raise ValueError(f"placeholder {{{field}}} must be a plain field name")
        return template


class ExtractionSpec(_Strict):
    kind: Extraction
    marker: str | None = None

    @model_validator(mode="after")
    def _marker(self) -> "ExtractionSpec":
        if (self.kind is Extraction.final_number_after_marker) != bool(self.marker):
            raise ValueError("marker is required for final_number_after_marker and only for it")
        return self


class GenerationSpec(_Strict):
    max_new_tokens: int = Field(gt=0)
    greedy: Literal[True] = True     # sampling would make accuracy noisy; not offered
    # Generation ends at EOS or at any of these strings (kept in the output). An untrained
    # model rarely emits EOS; stopping where its answer must be over saves most of the time.
    stop: list[str] = []


class Profile(_Strict):
    name: str = ""                   # filled from the key under `profiles`
    description: str = ""
    default_base: str                # used when the caller gives no --base
    max_steps: int = Field(gt=0)
    train_examples: int = Field(gt=0)
    eval_examples: int = Field(gt=0)  # rows (task_rows) or chunks (corpus)
    batch_size: int = Field(gt=0)
    eval_batch_size: int = Field(gt=0)
    grad_accum: int = Field(gt=0)
    lr: float = Field(gt=0)
    max_seq_len: int = Field(gt=0)
    num_workers: int = Field(gt=0)   # Ray Train workers
    use_gpu: bool
    distill_beta: float = Field(ge=0)  # weight of the attention-distillation regulariser; 0 = off
    save_steps: int = Field(ge=0)      # 0 = no intermediate checkpoints
    max_new_tokens: int | None = Field(default=None, gt=0)  # overrides generation.max_new_tokens
    seed: int = 0


class TaskSpec(_Strict):
    name: str
    description: str
    dataset: DatasetSpec
    format: FormatSpec | None = None
    extraction: ExtractionSpec
    metrics: list[Metric] = Field(min_length=1)
    main_metric: Metric
    direction: Literal["higher", "lower"]   # of main_metric; must agree with the metric itself
    tie_breaker: Metric | None = None       # decides the champion when main_metric ties (its own direction)
    generation: GenerationSpec
    profiles: dict[str, Profile] = Field(min_length=1)
    source_file: str = ""            # set by load_task, for messages

    @field_validator("profiles", mode="before")
    @classmethod
    def _name_profiles(cls, value):
        if isinstance(value, dict):
            return {k: {**v, "name": k} if isinstance(v, dict) else v for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "TaskSpec":
        rows = self.dataset.loader is DataLoader.task_rows
        if rows != (self.format is not None):
            raise ValueError("format is required for task_rows datasets and only for them")
        if self.main_metric not in self.metrics:
            raise ValueError(f"main_metric {self.main_metric.value!r} is not in metrics")
        if (self.direction == "higher") != self.main_metric.higher_is_better:
            raise ValueError(f"direction {self.direction!r} is wrong for {self.main_metric.value}")
        if self.tie_breaker is not None and (self.tie_breaker not in self.metrics or self.tie_breaker is self.main_metric):
            raise ValueError(f"tie_breaker {self.tie_breaker.value!r} must be one of metrics other than main_metric")
        needs_rows = {Metric.accuracy, Metric.answer_nll}
        for metric in self.metrics:
            if metric in needs_rows and not rows:
                raise ValueError(f"metric {metric.value!r} needs a task_rows dataset")
            if metric is Metric.perplexity and rows:
                raise ValueError("metric 'perplexity' needs a corpus dataset")
        if Metric.accuracy in self.metrics and self.extraction.kind is Extraction.none:
            raise ValueError("metric 'accuracy' needs an answer extraction")
        return self

    @property
    def higher_is_better(self) -> bool:
        return self.direction == "higher"

    def profile(self, name: str) -> Profile:
        if name not in self.profiles:
            raise UnknownTaskError(f"task {self.name!r} has no profile {name!r}; known: {', '.join(self.profiles)}")
        return self.profiles[name]

    def profile_with(self, name: str, overrides: dict | None = None) -> Profile:
        """Profile `name` with `overrides` applied and validated: one clear error naming the
        field, whether checked by the SDK before submitting or by the job itself."""
        from pydantic import ValidationError

        profile = self.profile(name)
        if unknown := sorted(set(overrides or {}) - set(type(profile).model_fields)):
            raise ValueError(f"overrides: unknown field(s) {unknown}; profile fields: {sorted(type(profile).model_fields)}")
        try:
            return type(profile).model_validate({**profile.model_dump(), **(overrides or {})})
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise ValueError(f"overrides for profile {name!r}: {where}={first.get('input')!r}: {first['msg']}") from None

    def max_new_tokens(self, profile: Profile) -> int:
        return profile.max_new_tokens or self.generation.max_new_tokens

    # -- formatting and extraction: pure functions of the spec

    def prompt(self, row: dict) -> str:
        return _fill(self.format.prompt, row, self.name)

    def completion(self, row: dict) -> str:
        clean = dict(row)
        for step in self.format.answer_cleanup:
            if step is AnswerCleanup.strip_calculator_annotations:
                clean = {k: re.sub(r"<<[^<>]*>>", "", v) if isinstance(v, str) else v for k, v in clean.items()}
        return _fill(self.format.answer, clean, self.name)

    def extract(self, text: str) -> str | None:
        """The answer read out of a generation (or a reference answer), normalised; None if absent."""
        if self.extraction.kind is Extraction.final_number_after_marker:
            return extract_number_after_marker(text, self.extraction.marker)
        return None

    def target(self, row: dict) -> str | None:
        return self.extract(str(row[self.format.target_field]))


# ----------------------------------------------------------------------------- extraction

_NUMBER = re.compile(r"-?\$?\s*\d[\d,]*(?:\.\d+)?")


def extract_number_after_marker(text: str, marker: str) -> str | None:
    """The first number after the first `marker`, normalised ("1,000.50" -> "1000.5", "$18" -> "18").

    The first marker counts: a model that keeps generating after its answer often writes a
    new question with its own "####" line.
    """
    at = text.find(marker)
    if at < 0:
        return None
    match = _NUMBER.search(text, at + len(marker))
    if match is None:
        return None
    raw = match.group(0).replace("$", "").replace(",", "").replace(" ", "")
    try:
        value = Decimal(raw)
    except InvalidOperation:
        return None
    # Canonical form: 18 == 18.0 == 18.00, no exponent.
    return format(value.normalize(), "f") if value != 0 else "0"


def _fill(template: str, row: dict, task: str) -> str:
    try:
        return template.format(**row)
    except KeyError as err:
        raise TaskSpecError(f"task {task!r}: template field {err} not in the row (fields: {', '.join(row)})") from None


# ----------------------------------------------------------------------------- loading


def tasks_dir() -> Path:
    """manifests/tasks beside the package (repo checkout, editable install), or LISA_HUB_TASKS_DIR."""
    override = os.environ.get("LISA_HUB_TASKS_DIR")
    if override:
        return Path(override).expanduser()
    return Path(__file__).resolve().parent.parent / "manifests" / "tasks"


def list_tasks() -> list[str]:
    folder = tasks_dir()
    if not folder.is_dir():
        raise UnknownTaskError(f"task spec folder {folder} does not exist; set LISA_HUB_TASKS_DIR "
                               "to a folder of <task>.yaml files (the repository's manifests/tasks)")
    return sorted(p.stem for p in folder.glob("*.yaml") if TASK_NAME.match(p.stem))


def load_task(name: str) -> TaskSpec:
    """The validated spec of a task. Only names of existing spec files are accepted."""
    import yaml

    known = list_tasks()
    if name not in known:  # also rejects anything path-like: only listed stems get through
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(known) or '(none)'} (in {tasks_dir()})")
    path = tasks_dir() / f"{name}.yaml"
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise TaskSpecError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise TaskSpecError(f"{path}: expected a mapping of fields, got {type(raw).__name__}")
    if raw.get("name") != name:
        raise TaskSpecError(f"{path}: field 'name' must be {name!r} (the file name), got {raw.get('name')!r}")
    try:
        return TaskSpec.model_validate({**raw, "source_file": str(path)})
    except ValidationError as err:
        raise TaskSpecError(_describe(path, err)) from None


def _describe(path: Path, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(part) for part in e["loc"]) or "(top level)"
        got = "" if e["type"] in ("missing", "extra_forbidden") else f" (got {e.get('input')!r:.60})"
        if e["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown field")
        else:
            lines.append(f"{where}: {e['msg']}{got}")
    return f"{path}: invalid task spec:\n  " + "\n  ".join(lines)


# ----------------------------------------------------------------------------- rows


def load_rows(spec: TaskSpec, purpose: Literal["train", "eval"], profile: Profile) -> list[dict]:
    """The examples a job trains or evaluates on, limited by the profile.

    task_rows: the first N rows of the split (the GSM8K files are already shuffled).
    corpus:    {"text": chunk} rows; with one split for both, eval takes the first
               eval_examples chunks and training the chunks after them (disjoint text).
               Training never reads a corpus's held-out tail (`data.trainable_text`).
    """
    from adapters_hub import data

    ds = spec.dataset
    split = ds.train_split if purpose == "train" else ds.eval_split
    n = profile.train_examples if purpose == "train" else profile.eval_examples
    if ds.loader is DataLoader.task_rows:
        return data.load_task_rows(ds.name, split)[:n]
    text = data.trainable_text(ds.name, split) if purpose == "train" else data.load_text(ds.name, split)
    chunks = [{"text": c} for c in chunk_text(text, ds.chunk_chars)]
    skip = profile.eval_examples if purpose == "train" and ds.train_split == ds.eval_split else 0
    return chunks[skip : skip + n]


def chunk_text(text: str, chunk_chars: int) -> list[str]:
    """Cut text at line ends into chunks of at least chunk_chars characters (the last may be shorter).

    Whitespace-only chunks are dropped; nothing else is lost: "".join(chunks) == text when
    there are none.
    """
    chunks, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        size += len(line)
        if size >= chunk_chars:
            chunks.append("".join(current))
            current, size = [], 0
    if current:
        chunks.append("".join(current))
    return [c for c in chunks if c.strip()]


def parse_overrides(items: list[str]) -> dict:
    """`--set FIELD=VALUE` flags -> profile overrides; VALUE is JSON when it parses, else a string."""
    import json

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out
