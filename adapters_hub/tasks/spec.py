"""The task spec schema: typed, validated views of a task's YAML file.

A task is data, not code: where its rows come from, how a row becomes a prompt and an
answer (plain text or chat messages), how an answer is read back out of a generation,
which metrics to compute and which one decides the champion, and the training profiles.
Everything a spec can ask for is a *name* from a fixed set (`DataLoader`, `FormatKind`,
`Extraction`, `Metric`, `AnswerCleanup`): a spec never imports or evaluates anything.
"""

from __future__ import annotations

import re
import string
from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from adapters_hub.tasks import scoring

TASK_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


class UnknownTaskError(LookupError):
    """No spec file of that name; the message lists the known tasks."""


class TaskSpecError(ValueError):
    """A spec file that is not valid YAML or does not match the schema; names file and field."""


class TaskDataError(ValueError):
    """Task data that does not fit its spec: names the file, the row and the field."""


# ----------------------------------------------------------------------------- closed name sets


class DataLoader(str, Enum):
    task_rows = "task_rows"  # built in: adapters_hub.data.load_task_rows (gsm8k)
    corpus = "corpus"        # built in: adapters_hub.data.load_text, cut into chunks here
    files = "files"          # a user's JSONL / CSV / Parquet files, paths relative to the spec
    hf = "hf"                # a Hugging Face dataset id, or a local dataset folder


class FormatKind(str, Enum):
    completion = "completion"  # prompt + completion text; the loss on the completion
    chat = "chat"              # messages rendered with the base tokenizer's chat template;
                               # the loss on the (last) assistant turn


class Extraction(str, Enum):
    final_number_after_marker = "final_number_after_marker"  # GSM8K: "... #### 18"
    regex = "regex"          # group 1 of `pattern`, normalised
    exact = "exact"          # the first line of the generation, normalised (SQuAD-style)
    label = "label"          # which of `labels` the generation names
    none = "none"            # nothing to extract (language modelling, multiple choice)


class Metric(str, Enum):
    accuracy = "accuracy"        # extracted answer == reference (generation)
    macro_f1 = "macro_f1"        # over the label set (label extraction)
    mc_accuracy = "mc_accuracy"  # multiple choice: the highest log-likelihood choice is right
    answer_nll = "answer_nll"    # mean NLL of the answer tokens given the prompt (teacher forced)
    perplexity = "perplexity"    # exp(mean next-token NLL) over token blocks of the eval text

    @property
    def higher_is_better(self) -> bool:
        return self in (Metric.accuracy, Metric.macro_f1, Metric.mc_accuracy)


class AnswerCleanup(str, Enum):
    # GSM8K answers carry calculator annotations "<<16-3-4=9>>" that are not natural text.
    strip_calculator_annotations = "strip_calculator_annotations"


# ----------------------------------------------------------------------------- schema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetSpec(_Strict):
    loader: DataLoader
    # built in (task_rows, corpus): checked against adapters_hub.data, one source of truth
    name: str | None = None
    hf_id: str | None = None         # built in and hf: the dataset id (hf: or a local dataset folder)
    hf_config: str | None = None
    train_split: str | None = None   # built in and hf
    eval_split: str | None = None    # hf: may be absent, then eval_fraction splits train
    mirror: dict[str, str] | None = None  # built in: split -> file under LISA_HUB_DATA_DIR
    chunk_chars: int | None = Field(default=None, gt=0)  # corpus: chunks of about this many characters
    # files: paths relative to the spec file (.jsonl, .csv, .parquet)
    train: str | None = None
    eval: str | None = None
    # no eval split: this fraction of the train rows, chosen by a seeded hash of each row
    # (stable: the same row always lands on the same side, whatever else the file holds)
    eval_fraction: float | None = Field(default=None, gt=0, lt=1)
    split_seed: int = 0
    columns: dict[str, str] = {}     # template field -> column of the data, when names differ

    @model_validator(mode="after")
    def _per_loader(self) -> "DatasetSpec":
        builtin = self.loader in (DataLoader.task_rows, DataLoader.corpus)
        allowed = {
            DataLoader.task_rows: {"name", "hf_id", "hf_config", "train_split", "eval_split", "mirror"},
            DataLoader.corpus: {"name", "hf_id", "hf_config", "train_split", "eval_split", "mirror", "chunk_chars"},
            DataLoader.files: {"train", "eval", "eval_fraction", "split_seed", "columns"},
            DataLoader.hf: {"hf_id", "hf_config", "train_split", "eval_split", "eval_fraction", "split_seed", "columns"},
        }[self.loader]
        given = {k for k in self.model_fields_set if k != "loader"}
        if extra := sorted(given - allowed):
            raise ValueError(f"loader {self.loader.value!r} does not take {extra}; it takes {sorted(allowed)}")
        if builtin:
            return self._matches_data_module()
        if self.loader is DataLoader.files and not self.train:
            raise ValueError("loader 'files' needs `train` (a .jsonl, .csv or .parquet file)")
        if self.loader is DataLoader.hf and not (self.hf_id and self.train_split):
            raise ValueError("loader 'hf' needs `hf_id` and `train_split`")
        has_eval = self.eval if self.loader is DataLoader.files else self.eval_split
        if bool(has_eval) == (self.eval_fraction is not None):
            raise ValueError("give exactly one of an eval split (`eval` / `eval_split`) and `eval_fraction`")
        return self

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
            if getattr(self, field) not in (self.mirror or {}):
                raise ValueError(f"{field} {getattr(self, field)!r} is not one of the splits {list(self.mirror or {})}")
        if (self.loader is DataLoader.corpus) != (self.chunk_chars is not None):
            raise ValueError("chunk_chars is required for corpus datasets and only for them")
        return self


class FormatSpec(_Strict):
    kind: FormatKind = FormatKind.completion
    prompt: str                      # template over the row's fields; chat: the user message
    answer: str | None = None        # the completion trained on; chat: the assistant message
                                     # (multiple choice: the right choice, rendered by `choice`)
    system: str | None = None        # chat only: a system message template
    target_field: str                # row field holding the reference answer
    answer_cleanup: list[AnswerCleanup] = []
    # multiple choice: the row field holding the list of choices; target_field then holds
    # the index of the right one (or its text), and `choice` renders each one as a completion
    choices_field: str | None = None
    choice: str = " {choice}"

    @field_validator("prompt", "answer", "system", "choice")
    @classmethod
    def _plain_fields_only(cls, template: str | None) -> str | None:
        # Only {name} placeholders: "{x.attr}" / "{x[0]}" would let a spec reach into objects.
        for field in placeholders(template or ""):
            if not field.isidentifier():
                raise ValueError(f"placeholder {{{field}}} must be a plain field name")
        return template

    @model_validator(mode="after")
    def _chat_fields(self) -> "FormatSpec":
        if self.system is not None and self.kind is not FormatKind.chat:
            raise ValueError("system is for kind 'chat' only")
        if (self.answer is None) != bool(self.choices_field):
            raise ValueError("give `answer` (the completion template), or `choices_field` for multiple choice "
                             "(the right choice is the completion), not both")
        return self

    def fields(self) -> set[str]:
        """Every row field the templates read (what the data must provide)."""
        names = placeholders(self.prompt) | placeholders(self.answer or "") | placeholders(self.system or "")
        names |= {self.target_field} | ({self.choices_field} if self.choices_field else set())
        return names


class ExtractionSpec(_Strict):
    kind: Extraction
    marker: str | None = None        # final_number_after_marker
    pattern: str | None = None       # regex
    labels: list[str] | None = None  # label

    @model_validator(mode="after")
    def _arguments(self) -> "ExtractionSpec":
        needs = {Extraction.final_number_after_marker: "marker", Extraction.regex: "pattern",
                 Extraction.label: "labels"}.get(self.kind)
        for field in ("marker", "pattern", "labels"):
            if (field == needs) != bool(getattr(self, field)):
                raise ValueError(f"{field} is required for {self.kind.value} and only for it" if field == needs
                                 else f"{field} is not used by extraction {self.kind.value!r}")
        if self.pattern:
            try:
                compiled = re.compile(self.pattern)
            except re.error as err:
                raise ValueError(f"pattern {self.pattern!r}: {err}") from None
            if compiled.groups > 1:
                raise ValueError("pattern: at most one capture group (the answer)")
        if self.labels and len({scoring.normalize(lab) for lab in self.labels}) != len(self.labels):
            raise ValueError("labels: two labels normalise to the same text")
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
    num_workers: int = Field(gt=0)   # Ray Train workers: data-parallel (DDP), each on its shard
    # where the workers go: PACK (fewest nodes), SPREAD, STRICT_SPREAD (one per node)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"
    use_gpu: bool
    distill_beta: float = Field(ge=0)  # weight of the attention-distillation regulariser; 0 = off
    # LoRA updates: the `lora` kind's, and the LoRA parts of a `lisa` adapter (adapters_hub.multi_lora)
    lora_rank: int | None = Field(default=None, ge=0)  # None: the kind's default; 0: a lisa adapter without parts
    lora_targets: list[Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "mlp"]] \
        | None = Field(default=None, min_length=1)     # None: the kind's default
    lisa_tensors: Literal["all", "aligner"] | None = None  # a lisa adapter's LiSA tensors that train (aligner:
                                                           # its low-rank Q/K stay); None: the kind's default
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
    source_file: str = ""            # set by load_task, for messages and data paths

    @field_validator("profiles", mode="before")
    @classmethod
    def _name_profiles(cls, value):
        if isinstance(value, dict):
            return {k: {**v, "name": k} if isinstance(v, dict) else v for k, v in value.items()}
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not TASK_NAME.match(value):
            raise ValueError("lower-case letters, digits, '_' and '-', starting with a letter or digit")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "TaskSpec":
        corpus = self.dataset.loader is DataLoader.corpus
        if corpus == (self.format is not None):
            raise ValueError("format is required for row datasets and not allowed for corpus datasets")
        if self.main_metric not in self.metrics:
            raise ValueError(f"main_metric {self.main_metric.value!r} is not in metrics")
        if (self.direction == "higher") != self.main_metric.higher_is_better:
            raise ValueError(f"direction {self.direction!r} is wrong for {self.main_metric.value}")
        if self.tie_breaker is not None and (self.tie_breaker not in self.metrics or self.tie_breaker is self.main_metric):
            raise ValueError(f"tie_breaker {self.tie_breaker.value!r} must be one of metrics other than main_metric")
        kind = self.extraction.kind
        for metric in self.metrics:
            if metric is Metric.perplexity and not corpus:
                raise ValueError("metric 'perplexity' needs a corpus dataset")
            if metric is not Metric.perplexity and corpus:
                raise ValueError(f"metric {metric.value!r} needs a row dataset")
            if metric is Metric.accuracy and kind is Extraction.none:
                raise ValueError("metric 'accuracy' needs an answer extraction")
            if metric is Metric.macro_f1 and kind is not Extraction.label:
                raise ValueError("metric 'macro_f1' needs extraction kind 'label'")
            if metric is Metric.mc_accuracy and not (self.format and self.format.choices_field):
                raise ValueError("metric 'mc_accuracy' needs format.choices_field")
        return self

    @property
    def higher_is_better(self) -> bool:
        return self.direction == "higher"

    @property
    def is_chat(self) -> bool:
        return self.format is not None and self.format.kind is FormatKind.chat

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

    # -- formatting and extraction: pure functions of the spec (and, for chat, the tokenizer)

    def messages(self, row: dict) -> tuple[list[dict], list[dict]]:
        """Chat: (prompt messages, completion messages) in TRL's conversational format."""
        prompt = ([{"role": "system", "content": _fill(self.format.system, row, self.name)}]
                  if self.format.system else [])
        prompt.append({"role": "user", "content": _fill(self.format.prompt, row, self.name)})
        return prompt, [{"role": "assistant", "content": self.completion(row)}]

    def prompt(self, row: dict, tokenizer=None) -> str:
        """The prompt text a model sees; for chat, rendered with `tokenizer`'s chat template
        and its generation prompt (the assistant turn's opening)."""
        if not self.is_chat:
            return _fill(self.format.prompt, row, self.name)
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise TaskSpecError(f"task {self.name!r} is a chat task: it needs a base model whose tokenizer "
                                "has a chat template")
        return tokenizer.apply_chat_template(self.messages(row)[0], tokenize=False, add_generation_prompt=True)

    def completion(self, row: dict) -> str:
        if self.format.choices_field:
            rendered, right = self.choices(row)
            return rendered[right]
        clean = dict(row)
        for step in self.format.answer_cleanup:
            if step is AnswerCleanup.strip_calculator_annotations:
                clean = {k: re.sub(r"<<[^<>]*>>", "", v) if isinstance(v, str) else v for k, v in clean.items()}
        return _fill(self.format.answer, clean, self.name)

    def choices(self, row: dict) -> tuple[list[str], int]:
        """Multiple choice: (each choice rendered as a completion, index of the right one)."""
        raw = row[self.format.choices_field]
        if isinstance(raw, str):  # a CSV cell holds a JSON list
            import json

            raw = json.loads(raw)
        options = [str(c) for c in raw]
        target = row[self.format.target_field]
        if isinstance(target, str) and not target.strip().lstrip("-").isdigit():
            index = options.index(target) if target in options else -1
        else:
            index = int(target)
        if not 0 <= index < len(options):
            raise TaskDataError(f"task {self.name!r}: {self.format.target_field}={target!r} is not a choice "
                                f"(index 0..{len(options) - 1} or one of the texts)")
        return [_fill(self.format.choice, {**row, "choice": c}, self.name) for c in options], index

    def extract(self, text: str) -> str | None:
        """The answer read out of a generation, normalised; None if absent."""
        ex = self.extraction
        if ex.kind is Extraction.final_number_after_marker:
            return scoring.extract_number_after_marker(text, ex.marker)
        if ex.kind is Extraction.regex:
            return scoring.extract_regex(text, ex.pattern)
        if ex.kind is Extraction.exact:
            return scoring.first_line(text)
        if ex.kind is Extraction.label:
            return scoring.match_label(text, ex.labels)
        return None

    def target(self, row: dict) -> str | None:
        """The reference answer in the form `extract` returns."""
        value = str(row[self.format.target_field])
        if self.extraction.kind is Extraction.final_number_after_marker:
            return scoring.extract_number_after_marker(value, self.extraction.marker)
        if self.extraction.kind is Extraction.label:
            return next((lab for lab in self.extraction.labels
                         if scoring.normalize(lab) == scoring.normalize(value)), None)
        return scoring.normalize(value)


def placeholders(template: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(template) if field}


def _fill(template: str, row: dict, task: str) -> str:
    try:
        return template.format(**row)
    except KeyError as err:
        where = f" ({row['_where']})" if "_where" in row else ""
        raise TaskDataError(f"task {task!r}{where}: template field {err} not in the row "
                            f"(fields: {', '.join(k for k in row if k != '_where')})") from None
