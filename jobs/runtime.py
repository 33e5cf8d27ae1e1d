"""Running a job on Ray, once for every job: the connection, run storage, the Train fit,
core pinning and the result line. `jobs/adapt.py` and `jobs/convert.py` call these; the
SDK's Serve app connects through `connect()` too.

    connect()                                   # RAY_ADDRESS, else the stack's head, else a local instance
    with run_lock(run_key): ...                 # identical jobs refused while one runs
    result = fit(train_loop, cfg, run_key=run_key, num_workers=2, what="training")
    print_result({...}); parse_result(log)      # the job's last line, and how the SDK reads it

Nothing here imports torch or Ray at import time (pydantic, for `JobSpec`, is light).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, ValidationError

RESULT_MARKER = "LISA_HUB_RESULT "
MAX_WORKER_FAILURES = 2  # Ray Train restarts of a failed worker group, each from the newest checkpoint


class JobConflictError(RuntimeError):
    """An identical job (same run key) is running: its checkpoints and folders are in use."""


# ----------------------------------------------------------------------------- connecting


def check_ray_address(address: str | None, timeout: float = 3.0) -> str | None:
    """`address` for ray.init, checked first when it is a GCS address (host:port): a closed
    port fails here within `timeout` with one line, not after Ray's ~35 s of retries."""
    if not address or address in ("auto", "local") or "://" in address:
        return address or None
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConnectionError(f"RAY_ADDRESS={address!r}: expected host:port (the GCS), http://host:8265 "
                              "(the job API) or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise ConnectionError(f"RAY_ADDRESS={address}: no Ray GCS answers there ({err.__class__.__name__}); "
                              "start the local stack with `lisa-hub up` or unset RAY_ADDRESS") from None
    return address


def ray_address() -> str:
    """Where a driver connects, settled in seconds: RAY_ADDRESS (checked), else this stack's
    head by its 127.0.0.1 GCS address, else "local" (a Ray instance of the driver's own).
    Never None: a plain ray.init() follows Ray's current-cluster note, which can name a head
    that is gone, and retries it for minutes. (Ray's "auto" finds a local head through the
    machine's external address, which our 127.0.0.1 head does not answer as itself: a Train
    controller started that way died before it ran.)"""
    from adapters_hub import stack

    address = check_ray_address(os.environ.get("RAY_ADDRESS"))
    gcs = stack.head_gcs_address()
    if address is not None:
        host, _, port = address.rpartition(":")
        if gcs is not None and host in ("127.0.0.1", "localhost") and port == gcs.rpartition(":")[2]:
            stack.use_ray_auth()  # RAY_ADDRESS names this stack's head: its token
        return address
    if gcs is not None:
        stack.use_ray_auth()  # the head's auth mode and token, before ray.init reads them
        return gcs
    return "local"


def connect() -> None:
    """ray.init for a driver (a job's, or the Serve CLI's); call it before expensive work."""
    import ray

    from adapters_hub import stack

    if not ray.is_initialized():
        address = ray_address()
        # a Ray instance of the driver's own gets the workers' environment the stack gives its
        # nodes (one print per line); a job on a cluster has it from its runtime_env already
        extra = {"runtime_env": {"env_vars": dict(stack.WORKER_ENV)}} if address == "local" else {}
        ray.init(address=address, log_to_driver=True, **extra)


def use_all_cores() -> None:
    """A job's driver evaluates models: give torch every core of the machine (a Ray job's
    entrypoint may inherit OMP_NUM_THREADS=1). LISA_HUB_THREADS overrides."""
    import torch

    torch.set_num_threads(int(os.environ.get("LISA_HUB_THREADS") or len(os.sched_getaffinity(0))))


DTYPES = ("auto", "float32", "bfloat16")  # a training job's `dtype` field


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bf16 natively (x86 AVX512-BF16 or AMX-BF16, Arm's BF16
    extension), from /proc/cpuinfo's flags (or the given text)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: no flags to read, so no claim
            return False
    flags = {f for line in cpuinfo.splitlines() if line.split(":")[0].strip() in ("flags", "Features")
             for f in line.split(":", 1)[-1].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def amp_dtype(dtype: str, device: str):
    """The autocast dtype of a training step: torch.bfloat16, or None for plain fp32.
    "auto" is bf16 where bf16 matmuls are native (a CUDA GPU that supports them; a CPU with
    `cpu_has_bf16`: on the project's 2-core EPYC 2.4x the fp32 matmul rate, a SmolLM2
    distillation step 1.47x faster) and fp32 elsewhere. Weights, optimizer state and every
    evaluation stay fp32; only the step's forward and backward run in bf16."""
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    if dtype == "auto":
        native = torch.cuda.is_bf16_supported() if device == "cuda" else cpu_has_bf16()
        dtype = "bfloat16" if native else "float32"
    return torch.bfloat16 if dtype == "bfloat16" else None


# ----------------------------------------------------------------------------- run storage


def run_dir(run_key: str) -> Path:
    """The driver's node-local folder of a run key: its lock and its adapter copies."""
    from adapters_hub import settings

    return settings.home() / "train" / run_key


@contextlib.contextmanager
def run_lock(run_key: str):
    """Hold `train/<run_key>.lock` for the job's life. The same spec submitted twice while
    the first runs: the second fails at once, naming the first; it does not race on the
    first's checkpoints. An OS file lock dies with its process, so a killed job's re-run
    takes the lock and resumes from the checkpoints it left."""
    import fcntl

    path = run_dir(run_key).with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise JobConflictError(f"an identical job is running ({holder}, run key {run_key}); wait for it to "
                                   "finish, or change the spec (e.g. --set seed=...)") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"job {os.environ.get('LISA_HUB_JOB_ID') or '-'} pid {os.getpid()}")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def check_storage(storage: str) -> None:
    """Refuse node-local run storage on a cluster of several nodes: a worker on another
    node could not write the run's checkpoints where the driver and a restarted worker
    read them."""
    import ray

    from adapters_hub import settings

    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    if len(nodes) > 1 and not settings.train_storage_is_shared():
        raise ValueError(f"storage: this cluster has {len(nodes)} nodes, and run checkpoints would go to the "
                         f"node-local {storage}; set LISA_HUB_STORAGE to a folder every node sees or to an "
                         "s3:// / gs:// URI (lisa-hub up --nodes sets it for a local cluster)")


def run_storage(storage: str, run_key: str):
    """(pyarrow filesystem, path) of a run's folder under `storage` (a folder or a URI)."""
    from pyarrow import fs

    if "://" in storage:
        filesystem, root = fs.FileSystem.from_uri(storage)
        return filesystem, f"{root.rstrip('/')}/{run_key}"
    return fs.LocalFileSystem(), str(Path(storage) / run_key)


def delete_run(run_key: str, log_prefix: str = "[job]") -> None:
    """Remove a finished run's checkpoints (the next run of the same spec starts fresh)."""
    from pyarrow.fs import FileType

    from adapters_hub import settings

    filesystem, path = run_storage(settings.train_storage(), run_key)
    try:
        if filesystem.get_file_info(path).type is not FileType.NotFound:
            filesystem.delete_dir(path)
    except OSError as err:  # leftovers cost space, not correctness
        print(f"{log_prefix} could not delete the finished run's checkpoints at {path}: {err}", flush=True)


def cpus_per_worker(num_workers: int) -> int:
    """Share the cluster's free CPUs among the workers. Ray gives a worker OMP_NUM_THREADS =
    its CPU reservation, so the default of 1 CPU would leave torch on one thread (measured:
    a training step twice as slow on 2 cores)."""
    import ray

    free = int(ray.available_resources().get("CPU", 1))
    # a worker cannot span nodes: no more than the largest node has
    per_node = max((int(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=1)
    return max(1, min(free // max(1, num_workers), per_node))


# ----------------------------------------------------------------------------- training


def fit(train_loop: Callable[[dict], None], config: dict, *, run_key: str, num_workers: int = 1,
        use_gpu: bool = False, placement_strategy: str = "PACK", max_failures: int = MAX_WORKER_FAILURES,
        fresh_start: bool = False, log_prefix: str = "[job]"):
    """Run `train_loop(config)` in a Ray Train TorchTrainer named `run_key` in the run
    storage (LISA_HUB_STORAGE, checked on multi-node clusters); an interrupted run of the
    same key resumes from its newest checkpoint unless `fresh_start`; a failed worker group
    is restarted from it up to `max_failures` times. Returns Ray's Result (checkpoint set)."""
    from pyarrow.fs import FileType
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from adapters_hub import settings

    connect()
    storage = settings.train_storage()
    check_storage(storage)
    fs, path = run_storage(storage, run_key)
    if fs.get_file_info(path).type is not FileType.NotFound:
        if fresh_start:
            fs.delete_dir(path)
        else:
            print(f"{log_prefix} found an interrupted run {run_key}: resuming from its last checkpoint", flush=True)
    trainer = TorchTrainer(
        train_loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker(num_workers)},
                                     placement_strategy=placement_strategy),
        run_config=RunConfig(name=run_key, storage_path=storage, checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"training failed: {result.error}")
    return result


# ----------------------------------------------------------------------------- the command line


class JobSpec(BaseModel):
    """A job's spec: validated data with closed fields (pydantic), one validation for the
    SDK, the CLI and the job. Construction errors are a `ValueError` whose message starts
    with the field, e.g. "kv_budget: must be in (0, 1) ...", not pydantic's multi-line
    report: the CLI prints it as one line."""

    model_config = ConfigDict(extra="forbid")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise ValueError(_first_error(err)) from None

    @classmethod
    def field_names(cls) -> list[str]:
        return list(cls.model_fields)


def _first_error(err: "ValidationError") -> str:
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if not where:  # a model-level check: its message names the field itself
        return msg
    if first["type"] == "extra_forbidden":
        return f"{where}: unknown field"
    return f"{where}: {msg}, got {first.get('input')!r}"


def parse_spec(argv: list[str] | None, *, prog: str, description: str, add_arguments: Callable, spec_type: type,
               from_args: Callable | None = None):
    """A job's spec from its command line: `--spec-json '{...}'` (what the SDK submits: the
    validated spec itself) or the job's own flags (`from_args(parsed)`; by default the flags
    named like the spec's fields)."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser)
    parser.add_argument("--spec-json", default=None, help=f"the whole {spec_type.__name__} as JSON (what the SDK "
                                                          "submits)")
    args = parser.parse_args(argv)
    if args.spec_json:
        return spec_type(**json.loads(args.spec_json))
    return from_args(args) if from_args else spec_from_args(spec_type, args)


def spec_from_args(spec_type: type, args) -> Any:
    """A spec from a job's argparse flags named like its fields (other flags are the CLI's)."""
    fields = set(spec_type.model_fields)
    return spec_type(**{k: v for k, v in vars(args).items() if k in fields})


def run_main(main: Callable, parse_args: Callable, prefix: str) -> None:
    """A job's `python -m` entry point: known failures (bad input, a missing model or
    service, an identical job running) print one clear line and exit 2, not a traceback."""
    import sys

    from adapters_hub.architectures import UnsupportedArchitectureError
    from adapters_hub.registry import RegistryError

    try:
        main(parse_args())
    except (LookupError, ValueError, ConnectionError, RegistryError, UnsupportedArchitectureError,
            JobConflictError) as err:
        print(f"[{prefix}] error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


# ----------------------------------------------------------------------------- the result line


def print_result(result: dict[str, Any]) -> None:
    """The job's last line: RESULT_MARKER + one JSON object (what the SDK's wait() returns)."""
    print(RESULT_MARKER + json.dumps(result), flush=True)


def parse_result(logs: str) -> dict[str, Any] | None:
    """The JSON of the last result line of a job log, or None."""
    for line in reversed(logs.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    return None
