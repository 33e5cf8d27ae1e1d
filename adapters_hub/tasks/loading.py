"""Finding, reading and validating task specs; the rows a job trains and evaluates on.

Built-in specs live in the repository's manifests/tasks/ (beside the package, where an
editable install and a Ray job's working_dir both find them; LISA_HUB_TASKS_DIR
overrides). A user's spec is any YAML file, named by path; its data paths are relative
to it. A user's spec may not take a built-in task's name.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from adapters_hub.tasks.spec import TASK_NAME, DataLoader, Profile, TaskSpec, TaskSpecError, UnknownTaskError


def tasks_dir() -> Path:
    """manifests/tasks beside the package (repo checkout, editable install), or LISA_HUB_TASKS_DIR."""
    override = os.environ.get("LISA_HUB_TASKS_DIR")
    return Path(override).expanduser() if override else builtin_tasks_dir()


def builtin_tasks_dir() -> Path:
    """The repository's manifests/tasks: the built-in specs, whatever LISA_HUB_TASKS_DIR says."""
    return Path(__file__).resolve().parents[2] / "manifests" / "tasks"


def list_tasks() -> list[str]:
    folder = tasks_dir()
    if not folder.is_dir():
        raise UnknownTaskError(f"task spec folder {folder} does not exist; set LISA_HUB_TASKS_DIR "
                               "to a folder of <task>.yaml files (the repository's manifests/tasks)")
    return sorted(p.stem for p in folder.glob("*.yaml") if TASK_NAME.match(p.stem))


def load_task(name: str, spec_file: str | Path | None = None) -> TaskSpec:
    """The validated spec of a task: by name from the tasks folder, or from `spec_file`
    (then `name`, when given, must be the spec's name)."""
    if spec_file is not None:
        spec = load_task_file(spec_file)
        if name and name != spec.name:
            raise TaskSpecError(f"{spec_file}: the spec is task {spec.name!r}, not {name!r}")
        return spec
    known = list_tasks()
    if name not in known:  # also rejects anything path-like: only listed stems get through
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(known) or '(none)'} (in {tasks_dir()}); "
                               "a task of your own: pass its spec file (--spec my_task.yaml)")
    return _parse(tasks_dir() / f"{name}.yaml", expect_name=name)


def load_task_file(path: str | Path) -> TaskSpec:
    """A user's spec file anywhere. Its name may not be a built-in task's."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise TaskSpecError(f"task spec file {path} does not exist")
    spec = _parse(path, expect_name=None)
    builtin = builtin_tasks_dir()
    if path.parent != builtin and (builtin / f"{spec.name}.yaml").is_file():
        raise TaskSpecError(f"{path}: name {spec.name!r} is a built-in task; give your task another name")
    return spec


def spec_digest(spec: TaskSpec) -> str:
    """sha256 of the spec file's bytes (recorded on the MLflow run and model version)."""
    return hashlib.sha256(Path(spec.source_file).read_bytes()).hexdigest() if spec.source_file else ""


def _parse(path: Path, *, expect_name: str | None) -> TaskSpec:
    import yaml

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise TaskSpecError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise TaskSpecError(f"{path}: expected a mapping of fields, got {type(raw).__name__}")
    if expect_name is not None and raw.get("name") != expect_name:
        raise TaskSpecError(f"{path}: field 'name' must be {expect_name!r} (the file name), got {raw.get('name')!r}")
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
    files, hf: the first N rows of that side (`tasks.sources`), each checked against the spec.
    """
    from adapters_hub import data

    ds = spec.dataset
    n = profile.train_examples if purpose == "train" else profile.eval_examples
    if ds.loader in (DataLoader.files, DataLoader.hf):
        from adapters_hub.tasks.sources import read_rows

        return read_rows(spec, purpose)[:n]
    split = ds.train_split if purpose == "train" else ds.eval_split
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
