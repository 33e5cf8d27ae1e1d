"""Task specs: what a task is (data, format, answer checks, metrics, profiles), validated.

    list_tasks()                       -> ["gsm8k", "wikitext2"]           built-in specs
    spec = load_task("gsm8k")          -> TaskSpec
    spec = load_task_file("my_task.yaml")                                  a user's spec, anywhere
    spec.profile("quick")              -> Profile
    load_rows(spec, "eval", spec.profile("smoke")) -> list[dict]

Modules: `spec` (the schema and its closed vocabularies), `loading` (finding and parsing
specs, the rows of a job), `sources` (a user's JSONL / CSV / Parquet / HF data),
`scoring` (pure answer checks), `cli` (`lisa-hub task init | check`).
"""

from adapters_hub.tasks.loading import (
    builtin_tasks_dir,
    chunk_text,
    list_tasks,
    load_rows,
    load_task,
    load_task_file,
    parse_overrides,
    spec_digest,
    tasks_dir,
)
from adapters_hub.tasks.scoring import extract_number_after_marker, normalize
from adapters_hub.tasks.spec import (
    TASK_NAME,
    AnswerCleanup,
    DataLoader,
    DatasetSpec,
    Extraction,
    ExtractionSpec,
    FormatKind,
    FormatSpec,
    GenerationSpec,
    Metric,
    Profile,
    TaskDataError,
    TaskSpec,
    TaskSpecError,
    UnknownTaskError,
)

__all__ = [
    "TASK_NAME", "AnswerCleanup", "DataLoader", "DatasetSpec", "Extraction", "ExtractionSpec", "FormatKind",
    "FormatSpec", "GenerationSpec", "Metric", "Profile", "TaskDataError", "TaskSpec", "TaskSpecError",
    "UnknownTaskError", "builtin_tasks_dir", "chunk_text", "extract_number_after_marker", "list_tasks", "load_rows",
    "load_task", "load_task_file", "normalize", "parse_overrides", "spec_digest", "tasks_dir",
]
