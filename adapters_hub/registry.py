"""Adapters and backbone plans in the MLflow model registry.

Vocabulary is MLflow's: a *registered model* per task and adapter kind ("gsm8k-lisa"), one
*model version* per adaptation run, *tags* for what the version is, and *aliases*:
`candidate` (the latest registration) and `champion` (the best on the task's main metric,
what `Backbone.use("gsm8k")` loads). Stages are deprecated in MLflow and never used.

    reg = Registry()                                  # settings.mlflow_uri(), probed quickly
    reg.register_adapter(run_id=..., adapter_dir=..., task="gsm8k", kind="lisa", ...)
    reg.resolve("gsm8k-lisa@champion") -> Path        # verified local copy (cache)
    reg.list_adapters("gsm8k"), reg.get_adapter("gsm8k-lisa/3"), reg.promote("gsm8k-lisa", 3, "champion")
    reg.register_backbone("smollm2-135m", plan_dir) ; reg.get_backbone("smollm2-135m") -> Path | None

The module-level functions of the same names use a Registry on settings.mlflow_uri().

Integrity: the artifact folder is logged with a sha256 manifest (MANIFEST) and the version
carries the manifest's digest as tag `sha256`; resolve() checks both, so neither a
corrupted download nor a swapped file goes unnoticed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from adapters_hub import settings

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

CANDIDATE, CHAMPION = "candidate", "champion"
MANIFEST = "lisa_hub_sha256.json"
ADAPTER_ARTIFACT = "adapter"          # artifact path of an adapter folder inside its run
BACKBONE_ARTIFACT = "backbone_plan"
BACKBONE_EXPERIMENT = "lisa-hub-backbones"
TYPE_TAG = "lisa_hub.type"            # registered-model tag: "adapter" | "backbone"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_ALIAS = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


class RegistryError(RuntimeError):
    """A registry operation failed; the message says which and why."""


class RegistryUnavailableError(RegistryError):
    """The MLflow tracking server does not answer."""


class AdapterNotFoundError(RegistryError, LookupError):
    """No registered model / version / alias of that name; the message lists what exists."""


class ChecksumError(RegistryError):
    """Downloaded files do not match the manifest or the version's sha256 tag."""


@dataclass(frozen=True)
class RegisteredAdapter:
    name: str
    version: int
    aliases: tuple[str, ...]

    @property
    def ref(self) -> str:
        return f"{self.name}/{self.version}"


@dataclass(frozen=True)
class AdapterRecord:
    name: str
    version: int
    aliases: tuple[str, ...]
    tags: dict[str, str]
    metrics: dict[str, float]          # from the metric.<name> tags
    run_id: str | None
    created: datetime
    source: str = ""

    @property
    def ref(self) -> str:
        return f"{self.name}/{self.version}"


# ----------------------------------------------------------------------------- manifest


def build_manifest(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under folder (the manifest file itself excluded)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel != MANIFEST:
            files[rel] = _sha256(path)
    return files


def manifest_digest(files: dict[str, str]) -> str:
    """One digest for the folder: sha256 over "hash  path" lines, sorted (sha256sum's format)."""
    lines = "".join(f"{digest}  {rel}\n" for rel, digest in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def verify_folder(folder: Path, expected_digest: str | None) -> None:
    """Raise ChecksumError unless folder holds exactly the manifest's files with their hashes."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ChecksumError(f"{folder}: no {MANIFEST}")
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise ChecksumError(f"{manifest_path}: unreadable manifest ({err})") from None
    if expected_digest and manifest_digest(files) != expected_digest:
        raise ChecksumError(f"{manifest_path}: manifest digest differs from the version's sha256 tag")
    actual = build_manifest(folder)
    missing, extra = sorted(set(files) - set(actual)), sorted(set(actual) - set(files))
    bad = sorted(rel for rel in set(files) & set(actual) if files[rel] != actual[rel])
    if missing or extra or bad:
        raise ChecksumError(f"{folder}: checksum mismatch (changed: {bad}, missing: {missing}, unexpected: {extra})")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- names


def parse_ref(ref: str) -> tuple[str, str | None, int | None]:
    """"name@alias" | "name/3" | "name" (= champion), optionally "models:/"-prefixed -> (name, alias, version)."""
    body = ref.removeprefix("models:/").strip()
    name, alias, version = body, None, None
    if "@" in body:
        name, alias = body.split("@", 1)
    elif "/" in body:
        name, raw = body.split("/", 1)
        if not raw.isdigit():
            raise ValueError(f"adapter ref {ref!r}: version must be a number (name/3) or use name@alias")
        version = int(raw)
    else:
        alias = CHAMPION
    if not _NAME.match(name) or (alias is not None and not _ALIAS.match(alias)):
        raise ValueError(f"adapter ref {ref!r}: expected NAME, NAME@ALIAS or NAME/VERSION "
                         "(letters, digits, '.', '_', '-')")
    return name, alias, version


def adapter_model_name(task: str, kind: str, backbone: str = "lisa") -> str:
    """<task>-<kind>, or <task>-<kind>-dense for adapters of the dense (unmodified) backbone."""
    name = f"{task}-{kind}" + ("-dense" if backbone == "dense" else "")
    if not _NAME.match(name):
        raise ValueError(f"registered model name {name!r}: task and kind may use letters, digits, '.', '_', '-'")
    return name


def backbone_model_name(base: str) -> str:
    """backbone-<base>, with base made MLflow-safe; a short hash keeps sanitised names distinct."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-._") or "base"
    if safe != base or len(safe) > 100:
        safe = f"{safe[:100]}-{hashlib.sha256(base.encode()).hexdigest()[:8]}"
    return f"backbone-{safe}"


# ----------------------------------------------------------------------------- registry


def beats(new: dict[str, float], champion_tags: dict[str, str], ranking: list[tuple[str, bool]], *,
          where: str = "champion") -> bool:
    """The champion policy: does a version with metrics `new` beat the champion whose tags
    hold `metric.<name>` = repr(float)? `ranking` = [(metric, higher_is_better), ...]: the
    first metric that differs decides (the main metric, then the tie-breaker); a full tie
    keeps the champion. A champion lacking a metric (the spec changed) loses on the main
    metric and keeps its place on a tie-breaker."""
    for i, (metric, higher) in enumerate(ranking):
        old = champion_tags.get(f"metric.{metric}")
        if old is None:
            log.warning("%s has no %s", where, metric)
            return i == 0
        a, b = float(new[metric]), float(old)  # tags hold repr(float): an exact round trip
        if a != b:
            return a > b if higher else a < b
    return False


@dataclass
class Registry:
    tracking_uri: str = field(default_factory=settings.mlflow_uri)
    probe_timeout: float = 3.0
    _client_obj: "MlflowClient | None" = field(default=None, init=False, repr=False)

    # -- connection

    def client(self) -> "MlflowClient":
        """An MlflowClient on tracking_uri, after a quick health probe (once per Registry)."""
        if self._client_obj is None:
            self._probe()
            # MLflow otherwise retries a dead server for minutes (7 retries, backoff 2, 120 s
            # timeout); fail within seconds instead. Only defaults: a user's setting wins.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
            from mlflow import MlflowClient

            self._client_obj = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        return self._client_obj

    def _probe(self) -> None:
        if not self.tracking_uri.startswith(("http://", "https://")):
            return  # file: / sqlite: stores need no server
        import requests

        url = self.tracking_uri.rstrip("/") + "/health"
        try:
            response = requests.get(url, timeout=self.probe_timeout)
            ok, why = response.status_code == 200, f"HTTP {response.status_code}"
        except requests.RequestException as err:
            ok, why = False, err.__class__.__name__
        if not ok:
            raise RegistryUnavailableError(
                f"MLflow tracking server at {self.tracking_uri} is unreachable ({why} from {url}). "
                "Start the local stack with `lisa-hub up`, or set MLFLOW_TRACKING_URI to a running server.")

    # -- adapters

    def register_adapter(self, *, run_id: str, adapter_dir: str | Path, task: str, kind: str, base: str,
                         base_fingerprint: str, plan_hash: str | None, metrics: dict[str, float],
                         main_metric: str, higher_is_better: bool, trainable_params: int,
                         tie_breaker: tuple[str, bool] | None = None, backbone: str = "lisa",
                         artifact_path: str = ADAPTER_ARTIFACT) -> RegisteredAdapter:
        """Log adapter_dir to the run and register it as a new version of "<task>-<kind>"
        ("<task>-<kind>-dense" for an adapter of the dense backbone).

        Aliases: `candidate` always; `champion` when it beats the current champion on
        main_metric (strictly), or on `tie_breaker` = (metric, higher_is_better) when
        main_metric ties, or there is no champion. All or nothing in the registry: any
        failure after the version exists deletes it, restores the aliases it moved and
        removes a registered model this call created. (Artifacts already logged to the run
        stay there: they belong to the run, not to the registry.)
        """
        name = adapter_model_name(task, kind, backbone)
        ranking = [(main_metric, higher_is_better)] + ([tie_breaker] if tie_breaker else [])
        for field, (metric, _) in zip(("main_metric", "tie_breaker"), ranking):
            if metric not in metrics:
                raise ValueError(f"{field} {metric!r} is not among the metrics {sorted(metrics)}")
        bad = {k: v for k, v in metrics.items() if not isinstance(v, (int, float)) or not math.isfinite(v)}
        if bad:
            raise ValueError(f"metrics must be finite numbers: {bad}")
        new_value = float(metrics[main_metric])
        tags = {
            "task": task, "kind": kind, "backbone": backbone, "base_model": base, "base_fingerprint": base_fingerprint,
            "plan_hash": plan_hash or "", "trainable_params": str(int(trainable_params)),
            "main_metric": main_metric, "higher_is_better": str(bool(higher_is_better)).lower(),
            "tie_breaker": tie_breaker[0] if tie_breaker else "",
            **{f"metric.{k}": repr(float(v)) for k, v in metrics.items()},
        }

        def beats_champion(champion: "ModelVersion | None") -> bool:
            if champion is None:
                return True
            return beats(metrics, champion.tags, ranking, where=f"{name} champion v{champion.version}")

        better = "higher" if higher_is_better else "lower"
        return self._register(
            name, Path(adapter_dir), run_id=run_id, artifact_path=artifact_path, tags=tags, type_="adapter",
            model_description=(f"lisa-hub {kind} adapters for task {task}, one version per adaptation run. "
                               f"Aliases: candidate = latest, champion = best {main_metric} ({better} is better)"
                               + (f", ties broken by {tie_breaker[0]}." if tie_breaker else ".")),
            version_description=f"{kind} adapter for {task} on {base}: {main_metric} = {new_value:.6g}",
            make_champion=beats_champion)

    def resolve(self, ref: str) -> Path:
        """A verified local copy of the version's artifact folder, from the cache or downloaded.

        A cached copy that fails verification is downloaded again, once; a fresh download
        that fails raises ChecksumError (the stored artifact itself is bad).
        """
        mv = self._version(ref)
        digest = mv.tags.get("sha256")
        if not digest:
            raise ChecksumError(f"{mv.name}/{mv.version} has no sha256 tag: not registered by lisa-hub")
        dest = settings.cache_dir("adapters", mv.name) / str(mv.version)
        if dest.exists():
            try:
                verify_folder(dest, digest)
                return dest
            except ChecksumError as err:
                log.warning("cached copy of %s/%s is corrupt (%s); downloading again", mv.name, mv.version, err)
                shutil.rmtree(dest)
        artifact_path = mv.tags.get("artifact_path", ADAPTER_ARTIFACT)
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{mv.version}.") as tmp:
            local = Path(self.client().download_artifacts(mv.run_id, artifact_path, dst_path=tmp))
            try:
                verify_folder(local, digest)
            except ChecksumError as err:
                raise ChecksumError(f"{mv.name}/{mv.version} (run {mv.run_id}, {artifact_path}): "
                                    f"downloaded artifacts fail verification: {err}") from None
            shutil.rmtree(dest, ignore_errors=True)  # a concurrent resolve may have won; ours is verified too
            os.replace(local, dest)  # atomic: a half-downloaded folder is never in the cache
        return dest

    def get_adapter(self, ref: str) -> AdapterRecord:
        mv = self._version(ref)
        return self._record(mv, self.client().get_registered_model(mv.name).aliases)

    def list_adapters(self, task: str | None = None) -> list[AdapterRecord]:
        """Every adapter version (optionally of one task), by name then version."""
        out = []
        for model in self._registered_models():
            if model.tags.get(TYPE_TAG) != "adapter":
                continue
            aliases = model.aliases
            for mv in self._versions(model.name):
                if task is None or mv.tags.get("task") == task:
                    out.append(self._record(mv, aliases))
        return sorted(out, key=lambda r: (r.name, r.version))

    def promote(self, name: str, version: int | str, alias: str = CHAMPION) -> AdapterRecord:
        """Point `alias` at name/version (e.g. a manual champion choice or a rollback)."""
        if not _ALIAS.match(alias):
            raise ValueError(f"alias {alias!r}: letters, digits, '_' and '-', starting with a letter")
        self._version(f"{name}/{int(version)}")  # clear error when it does not exist
        self.client().set_registered_model_alias(name, alias, str(int(version)))
        return self.get_adapter(f"{name}/{int(version)}")

    # -- backbones

    def register_backbone(self, base: str, plan_dir: str | Path, *, run_id: str | None = None,
                          plan_hash: str | None = None, base_fingerprint: str | None = None,
                          replace: bool = False) -> RegisteredAdapter:
        """Store a base model's sharing plan folder as registered model backbone-<base>, alias champion.

        One plan per base: every task adapter of that base is trained on it, so replacing
        it orphans their champions; that takes replace=True. Without run_id, a run in the
        experiment "lisa-hub-backbones" holds the artifacts.
        """
        name = backbone_model_name(base)
        if not replace:
            existing = self._alias_version(name, CHAMPION)
            if existing is not None:
                raise RegistryError(f"{name} already has a champion plan (version {existing}); "
                                    "pass replace=True (CLI: --replace) to make a new plan the backbone of this base")
        client = self.client()
        own_run = run_id is None
        if own_run:
            experiment = client.get_experiment_by_name(BACKBONE_EXPERIMENT)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(BACKBONE_EXPERIMENT)
            run_id = client.create_run(experiment_id, run_name=f"plan-{name}").info.run_id
        tags = {"base_model": base, "base_fingerprint": base_fingerprint or "", "plan_hash": plan_hash or ""}
        status = "FAILED"
        try:
            result = self._register(
                name, Path(plan_dir), run_id=run_id, artifact_path=BACKBONE_ARTIFACT, tags=tags, type_="backbone",
                model_description=(f"lisa-hub sharing plan of base model {base}; alias champion = the plan "
                                   "every task adapter of this base is trained on."),
                version_description=f"sharing plan for {base}", make_champion=lambda _: True,
                candidate=False)  # a plan is not a candidate of anything: it is the plan or it is not
            status = "FINISHED"
            return result
        finally:
            if own_run:
                client.set_terminated(run_id, status)

    def get_backbone(self, base: str) -> Path | None:
        """The verified local plan folder of `base`, or None when no plan is registered yet."""
        name = backbone_model_name(base)
        if self._alias_version(name, CHAMPION) is None:
            return None
        return self.resolve(f"{name}@{CHAMPION}")

    # -- internals

    def _register(self, name: str, folder: Path, *, run_id: str, artifact_path: str, tags: dict[str, str],
                  type_: str, model_description: str, version_description: str,
                  make_champion: Callable[["ModelVersion | None"], bool], candidate: bool = True) -> RegisteredAdapter:
        from mlflow.exceptions import MlflowException

        if not folder.is_dir() or not any(p.is_file() for p in folder.rglob("*")):
            raise FileNotFoundError(f"artifact folder {folder} does not exist or holds no files")
        client = self.client()
        files = build_manifest(folder)
        # 1. artifacts (no registry change yet)
        with tempfile.TemporaryDirectory() as tmp:
            manifest = Path(tmp) / MANIFEST
            manifest.write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=1, sort_keys=True))
            client.log_artifacts(run_id, str(folder), artifact_path)
            client.log_artifact(run_id, str(manifest), artifact_path)
        tags = {**tags, "sha256": manifest_digest(files), "artifact_path": artifact_path}

        # 2. registry: everything from here is undone on failure
        created_model = False
        try:
            model = client.get_registered_model(name)
        except MlflowException as err:
            if not _not_found(err):
                raise
            model = client.create_registered_model(name, tags={TYPE_TAG: type_}, description=model_description)
            created_model = True
        previous = dict(model.aliases)  # alias -> version, to restore on failure
        version = None
        try:
            mv = client.create_model_version(name, f"runs:/{run_id}/{artifact_path}", run_id=run_id, tags=tags,
                                             description=version_description)
            version = str(mv.version)
            if candidate:
                client.set_registered_model_alias(name, CANDIDATE, version)
            champion = client.get_model_version(name, previous[CHAMPION]) if CHAMPION in previous else None
            if make_champion(champion):
                client.set_registered_model_alias(name, CHAMPION, version)
            aliases = client.get_model_version(name, version).aliases
        except BaseException as err:
            self._rollback(name, version, previous, created_model)
            if not isinstance(err, Exception):  # KeyboardInterrupt & co. stay what they are
                raise
            raise RegistryError(f"registering {name} from run {run_id} failed and was rolled back: "
                                f"{err.__class__.__name__}: {err}") from err
        return RegisteredAdapter(name, int(version), tuple(sorted(aliases)))

    def _rollback(self, name: str, version: str | None, previous: dict[str, str], created_model: bool) -> None:
        client = self.client()
        steps: list[tuple[str, Callable[[], object]]] = []
        if version is not None:
            steps.append((f"delete version {version}", lambda: client.delete_model_version(name, version)))
        for alias in (CANDIDATE, CHAMPION):  # deleting the version dropped any alias we had moved onto it
            if alias in previous:
                steps.append((f"restore {alias}", lambda a=alias: client.set_registered_model_alias(name, a, previous[a])))
        if created_model:
            steps.append(("delete registered model", lambda: client.delete_registered_model(name)))
        for what, step in steps:
            try:
                step()
            except Exception as err:  # keep undoing the rest; report what could not be undone
                log.error("rollback of %s: could not %s: %s", name, what, err)

    def _version(self, ref: str) -> "ModelVersion":
        from mlflow.exceptions import MlflowException

        name, alias, version = parse_ref(ref)
        client = self.client()
        try:
            model = client.get_registered_model(name)
        except MlflowException as err:
            if not _not_found(err):
                raise
            known = ", ".join(m.name for m in self._registered_models()) or "(none)"
            raise AdapterNotFoundError(f"no registered model {name!r} in {self.tracking_uri}; known: {known}") from None
        if alias is not None:
            if alias not in model.aliases:
                have = ", ".join(f"{a} -> {v}" for a, v in sorted(model.aliases.items())) or "(none)"
                raise AdapterNotFoundError(f"{name} has no alias {alias!r}; aliases: {have}")
            return client.get_model_version(name, model.aliases[alias])
        try:
            return client.get_model_version(name, str(version))
        except MlflowException as err:
            if not _not_found(err):
                raise
            have = ", ".join(str(v.version) for v in self._versions(name)) or "(none)"
            raise AdapterNotFoundError(f"{name} has no version {version}; versions: {have}") from None

    def _alias_version(self, name: str, alias: str) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            return self.client().get_registered_model(name).aliases.get(alias)
        except MlflowException as err:
            if _not_found(err):
                return None
            raise

    def _registered_models(self) -> list:
        client, out, token = self.client(), [], None
        while True:
            page = client.search_registered_models(max_results=1000, page_token=token)
            out += list(page)
            token = page.token
            if not token:
                return out

    def _versions(self, name: str) -> list["ModelVersion"]:
        client, out, token = self.client(), [], None
        while True:
            page = client.search_model_versions(f"name = '{name}'", max_results=1000, page_token=token)
            out += list(page)
            token = page.token
            if not token:
                return sorted(out, key=lambda mv: int(mv.version))

    @staticmethod
    def _record(mv: "ModelVersion", aliases: dict[str, str]) -> AdapterRecord:
        # search results may lack aliases; the registered model's alias map is authoritative
        mine = tuple(sorted(a for a, v in aliases.items() if str(v) == str(mv.version)))
        metrics = {k.removeprefix("metric."): float(v) for k, v in mv.tags.items() if k.startswith("metric.")}
        created = datetime.fromtimestamp((mv.creation_timestamp or 0) / 1000, tz=timezone.utc)
        return AdapterRecord(mv.name, int(mv.version), mine, dict(mv.tags), metrics, mv.run_id, created, mv.source or "")


def _not_found(err) -> bool:
    return getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


# ----------------------------------------------------------------------------- module-level API


@functools.lru_cache(maxsize=8)
def _registry(tracking_uri: str) -> Registry:
    """One Registry (one client, one health probe) per tracking URI for module-level calls."""
    return Registry(tracking_uri)


def _for(tracking_uri: str | None) -> Registry:
    return _registry(tracking_uri or settings.mlflow_uri())


def register_adapter(*, tracking_uri: str | None = None, **kwargs) -> RegisteredAdapter:
    return _for(tracking_uri).register_adapter(**kwargs)


def resolve(ref: str, *, tracking_uri: str | None = None) -> Path:
    return _for(tracking_uri).resolve(ref)


def get_adapter(ref: str, *, tracking_uri: str | None = None) -> AdapterRecord:
    return _for(tracking_uri).get_adapter(ref)


def list_adapters(task: str | None = None, *, tracking_uri: str | None = None) -> list[AdapterRecord]:
    return _for(tracking_uri).list_adapters(task)


def promote(name: str, version: int | str, alias: str = CHAMPION, *, tracking_uri: str | None = None) -> AdapterRecord:
    return _for(tracking_uri).promote(name, version, alias)


def register_backbone(base: str, plan_dir: str | Path, *, tracking_uri: str | None = None, **kwargs) -> RegisteredAdapter:
    return _for(tracking_uri).register_backbone(base, plan_dir, **kwargs)


def get_backbone(base: str, *, tracking_uri: str | None = None) -> Path | None:
    return _for(tracking_uri).get_backbone(base)
