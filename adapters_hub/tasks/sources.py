"""Rows of a user's task data: local JSONL / CSV / Parquet files or a Hugging Face dataset.

Every row is a plain dict with `_where` ("train.csv row 17") for messages; `columns`
renames data columns to template fields; without an eval split a seeded hash of each row
puts `eval_fraction` of them in eval (stable when rows are added or reordered).

    read_rows(spec, "train") -> [{"question": ..., "answer": ..., "_where": "data.jsonl line 3"}, ...]
    data_files(spec)         -> the local files (and folders) a job must carry with the spec
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from adapters_hub.tasks.spec import DataLoader, TaskDataError, TaskSpec

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def spec_folder(spec: TaskSpec) -> Path:
    return Path(spec.source_file).parent if spec.source_file else Path.cwd()


def data_files(spec: TaskSpec) -> list[Path]:
    """Local paths the spec reads (files loader: train/eval; hf loader: a local dataset folder)."""
    ds = spec.dataset
    if ds.loader is DataLoader.files:
        return [_resolve(spec, p) for p in (ds.train, ds.eval) if p]
    if ds.loader is DataLoader.hf and (spec_folder(spec) / ds.hf_id).exists():
        return [_resolve(spec, ds.hf_id)]
    return []


def read_rows(spec: TaskSpec, purpose: str) -> list[dict]:
    """All rows of the train or eval side, renamed by `columns`, each checked to provide
    every template field (TaskDataError naming file, row and field otherwise)."""
    ds = spec.dataset
    if ds.loader is DataLoader.files:
        own = ds.train if purpose == "train" or ds.eval_fraction else ds.eval
        rows = read_file(_resolve(spec, own))
    elif ds.loader is DataLoader.hf:
        split = ds.train_split if purpose == "train" or ds.eval_fraction else ds.eval_split
        rows = _read_hf(spec, split)
    else:
        raise ValueError(f"{ds.loader.value} datasets are read by adapters_hub.data")
    if ds.eval_fraction:
        rows = [r for r in rows if _in_eval(r, ds.split_seed, ds.eval_fraction) == (purpose == "eval")]
    if not rows:
        where = own if ds.loader is DataLoader.files else f"{ds.hf_id} split {split}"
        raise TaskDataError(f"task {spec.name!r}: the {purpose} side of {where} has no rows"
                            + (f" (eval_fraction {ds.eval_fraction})" if ds.eval_fraction else ""))
    return [check_row(spec, _rename(r, ds.columns)) for r in rows]


def check_row(spec: TaskSpec, row: dict) -> dict:
    """The row, after checking it holds every field the templates and answer checks read."""
    where = row.get("_where", "a row")
    for field in sorted(spec.format.fields()):
        if field not in row or row[field] is None or (isinstance(row[field], str) and not row[field].strip()):
            have = ", ".join(k for k in row if k != "_where")
            raise TaskDataError(f"task {spec.name!r}: {where}: field {field!r} is missing or empty (row has: {have})")
    if spec.format.choices_field:
        choices = row[spec.format.choices_field]
        if isinstance(choices, str):  # CSV cells hold JSON lists
            try:
                choices = json.loads(choices)
            except ValueError:
                choices = None
        if not isinstance(choices, list) or len(choices) < 2:
            raise TaskDataError(f"task {spec.name!r}: {where}: field {spec.format.choices_field!r} must be a list "
                                f"of at least 2 choices")
        row = {**row, spec.format.choices_field: choices}
        spec.choices(row)  # the target names one of them
    if spec.extraction.labels and spec.target(row) is None:
        raise TaskDataError(f"task {spec.name!r}: {where}: {spec.format.target_field}="
                            f"{row[spec.format.target_field]!r} is not one of the labels {spec.extraction.labels}")
    return row


def read_file(path: Path) -> list[dict]:
    """Rows of a .jsonl / .json / .csv / .parquet file, each with `_where`."""
    if not path.is_file():
        raise TaskDataError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = []
        with path.open(encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as err:
                    raise TaskDataError(f"{path} line {number}: not a JSON object ({err})") from None
                if not isinstance(row, dict):
                    raise TaskDataError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
                rows.append({**row, "_where": f"{path.name} line {number}"})
        return rows
    if suffix == ".csv":
        import csv

        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            rows = []
            for number, row in enumerate(reader, 2):  # line 1 is the header
                if None in row:
                    raise TaskDataError(f"{path} line {number}: more cells than the header has columns")
                rows.append({**row, "_where": f"{path.name} line {number}"})
            return rows
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path).to_pylist()
        return [{**row, "_where": f"{path.name} row {i}"} for i, row in enumerate(table, 1)]
    raise TaskDataError(f"data file {path}: unsupported type {suffix!r}; use one of {', '.join(SUFFIXES)}")


def _read_hf(spec: TaskSpec, split: str) -> list[dict]:
    """A split of a Hugging Face dataset: a folder saved with `save_to_disk`, a folder of data
    files, or a hub id (the real hub path; offline, name a local folder instead)."""
    import datasets

    ds = spec.dataset
    local = spec_folder(spec) / ds.hf_id
    try:
        if (local / "dataset_dict.json").is_file() or (local / "dataset_info.json").is_file():
            loaded = datasets.load_from_disk(str(local))
            table = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        else:
            table = datasets.load_dataset(str(local) if local.exists() else ds.hf_id, ds.hf_config, split=split)
    except KeyError:
        raise TaskDataError(f"task {spec.name!r}: dataset {ds.hf_id} has no split {split!r}") from None
    except Exception as err:  # offline, unknown id, bad folder: one clear line
        raise TaskDataError(f"task {spec.name!r}: dataset {ds.hf_id!r} ({split}) could not be loaded: "
                            f"{err.__class__.__name__}: {str(err)[:300]}") from None
    return [{**row, "_where": f"{ds.hf_id} {split} row {i}"} for i, row in enumerate(table, 1)]


def _rename(row: dict, columns: dict[str, str]) -> dict:
    if not columns:
        return row
    out = dict(row)
    for field, column in columns.items():
        if column in row:
            out[field] = row[column]
    return out


def _in_eval(row: dict, seed: int, fraction: float) -> bool:
    content = json.dumps({k: v for k, v in row.items() if k != "_where"}, sort_keys=True, default=str)
    digest = hashlib.sha256(f"{seed}:{content}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _resolve(spec: TaskSpec, relative: str) -> Path:
    path = Path(relative).expanduser()
    return path if path.is_absolute() else spec_folder(spec) / path
