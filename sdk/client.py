"""Submitting adaptation jobs to a Ray cluster and following them.

    import sdk
    job = sdk.submit_adaptation(task="gsm8k", profile="quick")
    job.tail()                      # streams the job log
    result = job.wait()             # AdaptationResult: model version, aliases, metrics
    print(result.model_name, result.version, result.metrics)

Jobs go through Ray's JobSubmissionClient (the same API the Ray dashboard shows): the
entrypoint is `python -m jobs.adapt ...`, the repository's code travels as the job's
working_dir, and the job metadata (task, kind, base, profile) names each job in the
dashboard's job list. The job prints one line `LISA_HUB_RESULT {json}` at its end; the
SDK reads the result from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from jobs.runtime import parse_result as _parse_result_line
REPO_ROOT = Path(__file__).resolve().parents[1]


class JobStatus(str, Enum):
    """Status of an adaptation job (mirrors Ray's job states)."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"

    def is_terminal(self) -> bool:
        return self in (JobStatus.STOPPED, JobStatus.SUCCEEDED, JobStatus.FAILED)

    def __str__(self) -> str:
        return self.value


class ClusterUnavailableError(ConnectionError):
    """The Ray cluster's job API does not answer."""


class JobFailedError(RuntimeError):
    """An adaptation job ended without a result; the message holds its error and log tail."""


@dataclass(frozen=True)
class AdaptationResult:
    """What a finished adaptation produced (from the job's LISA_HUB_RESULT line)."""

    job_id: str
    run_id: str
    model_name: str            # registered model, e.g. "gsm8k-lisa"
    version: str               # model version in the MLflow registry
    aliases: list[str]         # e.g. ["candidate", "champion"]
    metrics: dict[str, float]
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def ref(self) -> str:
        return f"{self.model_name}/{self.version}"


@dataclass(frozen=True)
class JobSummary:
    id: str
    status: JobStatus
    task: str
    kind: str
    base: str
    profile: str
    entrypoint: str
    message: str


class AdaptationJob:
    """Handle on one submitted job. Get one from `submit_adaptation` or `get_job(id)`."""

    def __init__(self, job_id: str, *, address: str):
        self.id = job_id
        self.address = address
        self._client = _client(address)

    def __repr__(self) -> str:
        return f"AdaptationJob(id={self.id!r}, address={self.address!r})"

    def status(self) -> JobStatus:
        return JobStatus(str(self._client.get_job_status(self.id)))

    def logs(self) -> str:
        return self._client.get_job_logs(self.id)

    def tail(self, *, out=None) -> None:
        """Stream the job log until the job ends (then print the lines the stream missed)."""
        import sys

        out = out or sys.stdout
        seen = []

        async def _stream():
            async for chunk in self._client.tail_job_logs(self.id):
                out.write(chunk)
                out.flush()
                seen.append(chunk)

        try:
            asyncio.run(_stream())
        except Exception:  # a dropped stream is not fatal: fall back to the stored log below
            pass
        full, streamed = self.logs(), "".join(seen)
        if len(full) > len(streamed) and full.startswith(streamed):
            out.write(full[len(streamed):])
            out.flush()

    def wait(self, *, timeout: float | None = None, poll: float = 2.0) -> AdaptationResult:
        """Block until the job ends; its result, or JobFailedError with the job's log tail.

        >>> job = submit_adaptation(task="gsm8k", profile="smoke", base_model="tiny-llama")  # doctest: +SKIP
        >>> job.wait(timeout=600).aliases  # doctest: +SKIP
        ['candidate', 'champion']
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not (status := self.status()).is_terminal():
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.id} still {status} after {timeout:.0f} s")
            time.sleep(poll)
        logs = self.logs()
        result = self._parse(logs)
        if status is JobStatus.SUCCEEDED and result is not None:
            return result
        info = self._client.get_job_info(self.id)
        tail = "\n".join(logs.splitlines()[-30:])
        raise JobFailedError(f"job {self.id} ended {status}: {info.message or 'no message'}\n--- log tail ---\n{tail}")

    def stop(self) -> bool:
        return self._client.stop_job(self.id)

    def _parse(self, logs: str) -> AdaptationResult | None:
        return parse_result(self.id, logs)


def submit_adaptation(
    task: str | None = None,
    *,
    spec: str | Path | None = None,
    base_model: str | None = None,
    kind: str = "lisa",
    attention: str = "lisa",
    profile: str = "quick",
    overrides: dict[str, object] | None = None,
    address: str | None = None,
    submission_id: str | None = None,
    fresh_start: bool = False,
) -> AdaptationJob:
    """Submit an adaptation of `base_model` to `task` as a Ray job; returns its handle.

    `attention="dense"` trains on the unmodified base (the `lora` baseline, registered as
    "<task>-lora-dense"); the default is the base's LiSA backbone.

    A task of one's own: `spec="my_task.yaml"` (see `lisa-hub task init`); the spec and the
    data files it names (inside the spec's folder) travel with the job, no shared
    filesystem needed. `task`, when also given, must be the spec's name.

    Task, kind, profile and override names are checked here, before anything is submitted;
    so are a user task's data files (every row against the spec).
    A job whose earlier run (same task, kind, base, profile, plan) was interrupted resumes
    from that run's last checkpoint; `fresh_start=True` discards it and starts over.
    With no `address` and no RAY_ADDRESS, the local stack is used and started if down.

    >>> job = submit_adaptation(task="gsm8k", base_model="smollm2-135m", profile="quick")  # doctest: +SKIP
    >>> job.status()  # doctest: +SKIP
    <JobStatus.PENDING: 'PENDING'>
    """
    from adapters_hub.models import check_base
    from adapters_hub.tasks import load_task

    if task is None and spec is None:
        raise ValueError("task: give a task name or spec= (a task spec file of your own)")
    spec_path = Path(spec).expanduser().resolve() if spec is not None else None
    spec = load_task(task, spec_path)  # unknown task / malformed spec: clear error, nothing submitted
    task = spec.name
    from jobs.adapt import AdaptSpec

    job_spec = AdaptSpec(task=task, base=base_model, kind=kind, attention=attention, profile=profile,
                         overrides=dict(overrides or {}), fresh_start=fresh_start)  # validated here: nothing submitted
    if profile not in spec.profiles:
        raise ValueError(f"profile: task {task!r} has no profile {profile!r}; known: {', '.join(spec.profiles)}")
    overrides = dict(overrides or {})
    resolved = spec.profile_with(profile, overrides)  # checks override values too
    base = base_model or resolved.default_base
    check_base(base)
    carried = _task_files(spec, resolved) if spec_path else {}
    address = resolve_address(address)
    _check_mlflow()
    job_spec.base = base
    if carried:
        job_spec.spec_file = next(iter(carried))  # the spec's path inside the job's working_dir
    # the validated spec travels as JSON (no flags rebuilt from fields and parsed back)
    argv = ["python", "-m", "jobs.adapt", "--spec-json", json.dumps(job_spec.model_dump())]
    job_id = _submit(address, argv, submission_id,
                     {"task": task, "kind": kind, "attention": attention, "base": base, "profile": profile},
                     carried=carried)
    return AdaptationJob(job_id, address=address)


def submit_conversion(
    *,
    base_model: str = "smollm2-135m",
    fraction: float | None = None,
    max_ppl_increase: float | None = None,
    kv_budget: float | None = None,
    drop_attention: bool = False,
    minutes: float = 15.0,
    init_only: bool = False,
    register: bool = True,
    options: dict[str, object] | None = None,
    address: str | None = None,
    submission_id: str | None = None,
    fresh_start: bool = False,
) -> "ConversionJob":
    """Submit the conversion of `base_model` into a LiSA backbone as a Ray job (jobs/convert.py).

    At most one of `fraction` (share that fraction of the layers), `max_ppl_increase`
    (share the most layers whose perplexity stays within it) and `kv_budget` (the first plan
    whose KV cache is at most that fraction of dense) may be given; none means fraction 0.6.
    `drop_attention` lets the planner drop layers' attention too (a hybrid plan). `options` sets other ConvertSpec fields (e.g. {"lr": 1e-3}). With
    `register`, the result becomes `backbone-<base>@champion` with its general adapter.

    >>> job = submit_conversion(base_model="smollm2-135m", fraction=0.6, minutes=15)  # doctest: +SKIP
    >>> job.wait().metrics["converted.ppl_ratio"]  # doctest: +SKIP
    1.4
    >>> submit_conversion(base_model="smollm2-135m", kv_budget=0.5, drop_attention=True)  # doctest: +SKIP
    """
    from adapters_hub.models import check_base
    from jobs.convert import ConvertSpec

    fields = {"base": base_model, "fraction": fraction, "max_ppl_increase": max_ppl_increase, "kv_budget": kv_budget,
              "drop_attention": drop_attention, "minutes": minutes,
              "init_only": init_only, "register": register, "fresh_start": fresh_start, **(options or {})}
    unknown = sorted(set(fields) - set(ConvertSpec.model_fields) - {"out"})
    if unknown:
        raise ValueError(f"options: unknown field(s) {unknown}; known: {sorted(ConvertSpec.model_fields)}")
    spec = ConvertSpec(**fields)  # validated here: nothing is submitted for a bad spec
    check_base(base_model)
    import json
    # the validated spec travels as JSON (no flags rebuilt from fields and parsed back)
    argv = ["python", "-m", "jobs.convert", "--spec-json", json.dumps({k: v for k, v in spec.model_dump().items()
                                                                       if k != "out"})]
    address = resolve_address(address)
    if register:
        _check_mlflow()
    job_id = _submit(address, argv, submission_id,
                     {"task": "convert", "kind": "lisa", "attention": "lisa", "base": base_model, "profile": "-"})
    return ConversionJob(job_id, address=address)


def _check_mlflow() -> None:
    """The job's first check, made before submitting: an MLflow that does not answer fails
    the call (CLI: exit 2), not the job minutes later on the cluster."""
    from adapters_hub import registry, settings

    registry.Registry(tracking_uri=settings.mlflow_uri()).client()  # RegistryUnavailableError


def _task_files(spec, profile) -> dict[str, Path]:
    """A user task's files for the job's working_dir, spec first: {path in the package: local path}.
    Its rows are checked here (TaskDataError names file, row and field) unless they come from
    the Hugging Face hub, which the cluster reads itself."""
    from adapters_hub.tasks import DataLoader, load_rows
    from adapters_hub.tasks.sources import data_files, spec_folder

    folder = spec_folder(spec)
    files = data_files(spec)
    if files or spec.dataset.loader is DataLoader.files:
        load_rows(spec, "train", profile)
        load_rows(spec, "eval", profile)
    package = f"user_tasks/{spec.name}"
    carried = {f"{package}/{Path(spec.source_file).name}": Path(spec.source_file)}
    for path in files:
        try:
            relative = path.resolve().relative_to(folder.resolve())
        except ValueError:
            raise ValueError(f"{spec.source_file}: data {path} is outside the spec's folder; a job carries the "
                             "spec's folder only: move the data beside the spec (or below it)") from None
        carried[f"{package}/{relative.as_posix()}"] = path
    return carried


def _submit(address: str, argv: list[str], submission_id: str | None, metadata: dict[str, str],
            carried: dict[str, Path] | None = None) -> str:
    import uuid

    # Our own id, so the job knows it (MLflow tag ray_job_id, the run lock) from its first line.
    submission_id = submission_id or f"raysubmit_{uuid.uuid4().hex[:16]}"
    env_vars = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "LISA_HUB_DATA_DIR", "LISA_HUB_STORAGE")
                if k in os.environ}
    from adapters_hub.stack import WORKER_ENV

    env_vars.update(WORKER_ENV, LISA_HUB_JOB_ID=submission_id)
    client = _client(address)
    with _code_package(carried or {}) as working_dir:  # uploaded by submit_job; gone afterwards
        return client.submit_job(
            entrypoint=shlex.join(argv),
            submission_id=submission_id,
            runtime_env={"working_dir": working_dir, "env_vars": env_vars},
            # job_name: the readable name Ray's dashboard lists the job under
            metadata={**metadata, "app": "lisa-hub",
                      "job_name": " · ".join(metadata[k] for k in ("task", "kind", "base", "profile") if metadata.get(k))},
        )


@dataclass(frozen=True)
class ConversionResult:
    """What a finished conversion produced (from the job's LISA_HUB_RESULT line)."""

    job_id: str
    base: str
    plan_hash: str
    layers: list[int]          # the substituted layers
    metrics: dict[str, float]  # base / aligned / init / converted perplexity, ...
    model_name: str | None     # "backbone-<base>" when registered
    version: str | None
    raw: dict = field(default_factory=dict, repr=False)
    dropped: list[int] = field(default_factory=list)  # the layers whose attention the plan drops


class ConversionJob(AdaptationJob):
    """Handle on a submitted conversion; `wait()` returns a ConversionResult."""

    def _parse(self, logs: str) -> "ConversionResult | None":
        raw = _parse_result_line(logs)
        if raw is None:
            return None
        return ConversionResult(job_id=self.id, base=raw["base"], plan_hash=raw["plan_hash"],
                                layers=list(raw["layers"]), metrics=dict(raw["metrics"]),
                                model_name=raw.get("model_name"), version=raw.get("version"), raw=raw,
                                dropped=list(raw.get("dropped", [])))


def submit_pretraining(
    *,
    config: str = "bytes-6l",
    plan_fraction: float = 0.5,
    steps: int = 600,
    name: str | None = None,
    register: bool = True,
    options: dict[str, object] | None = None,
    address: str | None = None,
    submission_id: str | None = None,
) -> "PretrainingJob":
    """Submit the pre-training of a LiSA model from scratch (beside its dense twin) as a Ray
    job (jobs/pretrain.py). `config` is a preset of manifests/pretrain or a JSON file of
    yours (it travels with the job). With `register`, the result is base-<name> and
    backbone-<name>; `load_base(name)` and every job then know the name. `options` sets
    other PretrainSpec fields (e.g. {"lr": 1e-3, "seq_len": 256}).

    >>> job = submit_pretraining(config="bytes-6l", plan_fraction=0.5, steps=600)  # doctest: +SKIP
    >>> job.wait().metrics["ppl_ratio"]  # doctest: +SKIP
    1.03
    """
    import json

    from jobs.pretrain import PretrainSpec, load_config

    fields = {"config": config, "plan_fraction": plan_fraction, "steps": steps, "name": name, "register": register,
              **(options or {})}
    unknown = sorted(set(fields) - set(PretrainSpec.model_fields))
    if unknown:
        raise ValueError(f"options: unknown field(s) {unknown}; known: {sorted(PretrainSpec.model_fields)}")
    spec = PretrainSpec(**fields)  # validated here: nothing is submitted for a bad spec
    path = Path(load_config(spec.config)["path"])  # the config file too (ValueError naming it)
    carried = None
    if Path(spec.config).suffix:  # a file of the user's: it travels in the job's package
        carried = {f"pretrain_configs/{path.name}": path}
        spec = spec.model_copy(update={"config": f"pretrain_configs/{path.name}",
                                       "name": spec.base_name()})  # the name from the user's file name
    argv = ["python", "-m", "jobs.pretrain", "--spec-json", json.dumps(spec.model_dump())]
    address = resolve_address(address)
    if register:
        _check_mlflow()
    job_id = _submit(address, argv, submission_id,
                     {"task": "pretrain", "kind": "lisa", "attention": "lisa", "base": spec.base_name(),
                      "profile": "-"}, carried)
    return PretrainingJob(job_id, address=address)


@dataclass(frozen=True)
class PretrainingResult:
    """What a finished pre-training produced (from the job's LISA_HUB_RESULT line)."""

    job_id: str
    base: str                  # the new base's name: load_base(base) loads it
    plan_hash: str
    layers: list[int]          # the shared layers
    metrics: dict[str, float]  # lisa.perplexity, dense.perplexity, ppl_ratio, kv_ratio, ...
    model_name: str | None     # "backbone-<base>" when registered
    version: str | None
    raw: dict = field(default_factory=dict, repr=False)


class PretrainingJob(AdaptationJob):
    """Handle on a submitted pre-training; `wait()` returns a PretrainingResult."""

    def _parse(self, logs: str) -> "PretrainingResult | None":
        raw = _parse_result_line(logs)
        if raw is None:
            return None
        return PretrainingResult(job_id=self.id, base=raw["base"], plan_hash=raw["plan_hash"],
                                 layers=list(raw["layers"]), metrics=dict(raw["metrics"]),
                                 model_name=raw.get("model_name"), version=raw.get("version"), raw=raw)


@contextlib.contextmanager
def _code_package(carried: dict[str, Path] | None = None):
    """A temporary folder with the code a job runs (not tests, benchmarks or data) and a
    unique stamp. Unique on purpose: Ray skips uploading a package whose hash it has seen,
    and once the job that held it ends the GCS may already have deleted it, so a resubmit of
    unchanged code failed with "Failed to download runtime_env file package"
    (ray-project/ray#46625; it happened here within one test session)."""
    import shutil
    import tempfile
    import uuid

    with tempfile.TemporaryDirectory(prefix="lisa-hub-job-") as tmp:
        for name in _SHIPPED:
            src = REPO_ROOT / name
            if src.is_dir():
                shutil.copytree(src, Path(tmp) / name, ignore=shutil.ignore_patterns(*_EXCLUDES))
            elif src.is_file():
                shutil.copy2(src, Path(tmp) / name)
        for inside, local in (carried or {}).items():  # a user task: its spec and data
            target = Path(tmp) / inside
            target.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if local.is_dir() else shutil.copy2)(local, target)
        (Path(tmp) / ".lisa-hub-package").write_text(uuid.uuid4().hex)
        yield tmp


def get_job(job_id: str, *, address: str | None = None) -> AdaptationJob:
    address = resolve_address(address, start=False)
    job = AdaptationJob(job_id, address=address)
    job.status()  # raises for an unknown id
    return job


def list_jobs(*, address: str | None = None) -> list[JobSummary]:
    """lisa-hub jobs on the cluster, newest first."""
    address = resolve_address(address, start=False)
    out, started = [], []
    for info in _client(address).list_jobs():
        meta = info.metadata or {}
        if meta.get("app") != "lisa-hub":
            continue
        started.append(info.start_time or 0)
        out.append(JobSummary(info.submission_id or info.job_id, JobStatus(str(info.status)), meta.get("task", ""),
                              meta.get("kind", ""), meta.get("base", ""), meta.get("profile", ""),
                              info.entrypoint, info.message or ""))
    order = sorted(range(len(out)), key=lambda i: started[i], reverse=True)
    return [out[i] for i in order]


def parse_result(job_id: str, logs: str) -> AdaptationResult | None:
    """The result record from a job log (its last LISA_HUB_RESULT line), or None."""
    raw = _parse_result_line(logs)
    if raw is None:
        return None
    return AdaptationResult(job_id=job_id, run_id=raw["run_id"], model_name=raw["model_name"],
                            version=str(raw["version"]), aliases=list(raw["aliases"]),
                            metrics=dict(raw["metrics"]), raw=raw)


def resolve_address(address: str | None = None, *, start: bool = True) -> str:
    """The Ray job API address: `address`, else RAY_ADDRESS, else the local head (started
    when down, if `start`). Raises ClusterUnavailableError when it does not answer."""
    from adapters_hub import settings, stack

    explicit = address or os.environ.get("RAY_ADDRESS")
    if explicit:
        url = explicit if explicit.startswith("http") else f"http://{explicit.split(':')[0]}:{settings.RAY_DASHBOARD_PORT}"
        if url.rstrip("/") == stack.dashboard_url():
            stack.use_ray_auth()  # the local head named explicitly: its token
    else:
        url = stack.dashboard_url()
        stack.use_ray_auth()  # the local head's token (none recorded: nothing changes)
    if _answers(url):
        return url
    if not explicit and start:
        print("[lisa-hub] local stack is down; starting it (lisa-hub up) ...", flush=True)
        stack.up()  # and uses its token
        return stack.dashboard_url()
    raise ClusterUnavailableError(
        f"the Ray job API at {url} does not answer; start the local stack with `lisa-hub up` "
        "or point RAY_ADDRESS / address= at a running cluster's dashboard (http://host:8265)"
    )


def _answers(url: str) -> bool:
    import requests

    try:
        from adapters_hub import settings

        return requests.get(f"{url}/api/version", timeout=3, headers=settings.ray_auth_headers()).ok
    except requests.RequestException:
        return False


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


# What travels with a job: the code it runs, without caches or stray weights (the package
# is built from this list, so environments, VCS data and outputs never enter it).
_SHIPPED = ["adapters_hub", "jobs", "sdk", "manifests", "pyproject.toml"]
_EXCLUDES = ["__pycache__", "*.pyc", "*.safetensors", "*.gguf"]
