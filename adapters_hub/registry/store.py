"""The registry client: connection, registration (atomic against other registrations),
resolution into the verified local cache, listing and promotion.

Concurrency (several jobs registering into one MLflow at once; MLflow has no transactions
across calls and no compare-and-set on aliases):
- creating a registered model that another process just created is not an error;
- `champion` is settled, not set: after its own write each registration re-reads the
  versions and the alias, recomputes the champion with `champion.pick_champion` (a pure
  function of the versions) and writes again until what it reads is what it computed. The
  last writer has therefore seen every version registered before its write, and every
  later version's registration settles after it: the best version ends champion;
- a failed registration deletes its own version only, restores an alias only when the
  deletion left it unset, and removes a registered model only when it created it and no
  version is left;
- one sharing plan per base: the first registration of `backbone-<base>` is the one that
  creates the registered model (an atomic create in MLflow's store); a racing second one
  waits for that plan and gets PlanExistsError, which callers treat as "use it".
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from adapters_hub import settings
from adapters_hub.registry.champion import metrics_of, pick_champion
from adapters_hub.registry.errors import (
    AdapterNotFoundError,
    ChecksumError,
    PlanExistsError,
    RegistryError,
    RegistryUnavailableError,
)
from adapters_hub.registry.manifest import MANIFEST, build_manifest, manifest_digest, manifest_json, verify_folder
from adapters_hub.registry.refs import (
    CANDIDATE,
    CHAMPION,
    adapter_model_name,
    backbone_model_name,
    base_model_name,
    check_alias,
    parse_ref,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

ADAPTER_ARTIFACT = "adapter"          # artifact path of an adapter version (an MLflow model) inside its run
MODEL_ADAPTER = "artifacts/adapter"   # the adapter folder inside that MLflow model (registry/mlflow_model.py)
BACKBONE_ARTIFACT = "backbone_plan"
BACKBONE_EXPERIMENT = "lisa-hub-backbones"
BASE_ARTIFACT = "base_model"  # a pre-trained base's HF folder
TYPE_TAG = "lisa_hub.type"            # registered-model tag: "adapter" | "backbone"
FLOOR_TAG = "lisa_hub.champion_floor"  # registered-model tag: versions <= it no longer contend (manual promote)
PLAN_WAIT_S = 60.0                    # how long a racing plan registration waits for the winner's plan


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
            settings.use_mlflow_credentials()  # the stack's MLflow user, under --mlflow-auth
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
                         tie_breaker: tuple[str, bool] | None = None, attention: str = "lisa",
                         artifact_path: str = ADAPTER_ARTIFACT,
                         extra_tags: dict[str, str] | None = None) -> RegisteredAdapter:
        """Log adapter_dir to the run and register it as a new version of "<task>-<kind>"
        ("<task>-<kind>-dense" for an adapter of the dense backbone).

        Aliases: `candidate` always; `champion` when it beats the current champion on
        main_metric by more than champion.TOLERANCE, or on `tie_breaker` = (metric,
        higher_is_better) when main_metric ties, or there is no champion. All or nothing
        for this registration: a failure after the version exists deletes that version
        (never another's) and puts back an alias the deletion unset. (Artifacts already
        logged to the run stay there: they belong to the run, not to the registry.)
        """
        name = adapter_model_name(task, kind, attention)
        ranking = [(main_metric, higher_is_better)] + ([tie_breaker] if tie_breaker else [])
        for what, (metric, _) in zip(("main_metric", "tie_breaker"), ranking):
            if metric not in metrics:
                raise ValueError(f"{what} {metric!r} is not among the metrics {sorted(metrics)}")
        bad = {k: v for k, v in metrics.items() if not isinstance(v, (int, float)) or not math.isfinite(v)}
        if bad:
            raise ValueError(f"metrics must be finite numbers: {bad}")
        tags = {
            "task": task, "kind": kind, "attention": attention, "base_model": base, "base_fingerprint": base_fingerprint,
            "plan_hash": plan_hash or "", "trainable_params": str(int(trainable_params)),
            "main_metric": main_metric, "higher_is_better": str(bool(higher_is_better)).lower(),
            "tie_breaker": tie_breaker[0] if tie_breaker else "",
            **{f"metric.{k}": repr(float(v)) for k, v in metrics.items()},
            **(extra_tags or {}),
        }
        better = "higher" if higher_is_better else "lower"
        adapter_dir = Path(adapter_dir)
        if not adapter_dir.is_dir() or not any(p.is_file() for p in adapter_dir.rglob("*")):
            raise FileNotFoundError(f"artifact folder {adapter_dir} does not exist or holds no files")
        summary = f"{kind} adapter for {task} on {base}: {main_metric} = {float(metrics[main_metric]):.6g}"
        card = adapter_dir / "README.md"  # the model card, shown on the model version page
        from adapters_hub.registry import mlflow_model

        with tempfile.TemporaryDirectory() as tmp:  # the version is an MLflow model holding the adapter
            model_dir = mlflow_model.save(adapter_dir, Path(tmp) / "model")
            return self._register(
                name, model_dir, run_id=run_id, artifact_path=artifact_path, tags=tags, type_="adapter",
                model_description=(f"lisa-hub {kind} adapters for task {task}, one version per adaptation run. "
                                   f"Aliases: candidate = latest, champion = best {main_metric} ({better} is better)"
                                   + (f", ties broken by {tie_breaker[0]}." if tie_breaker else ".")),
                version_description=f"{summary}\n\n{card.read_text()}" if card.is_file() else summary,
                ranking=ranking)

    def resolve(self, ref: str) -> Path:
        """A verified local copy of the version's adapter (or plan) folder, from the cache or
        downloaded (an adapter version is an MLflow model: its adapter folder is returned).

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
                return adapter_folder(dest)
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
            try:
                os.replace(local, dest)  # atomic: a half-downloaded folder is never in the cache
            except OSError:
                # A concurrent resolve (another job on this node) put its copy there first:
                # keep it if it verifies, never delete a folder another process may be reading.
                if not dest.is_dir():
                    raise
                verify_folder(dest, digest)
        return adapter_folder(dest)

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
        """Point `alias` at name/version (e.g. a manual champion choice or a rollback).

        A manual champion stays until a version registered *after* the promotion beats it:
        the versions that existed then no longer contend (tag lisa_hub.champion_floor)."""
        check_alias(alias)
        self._version(f"{name}/{int(version)}")  # clear error when it does not exist
        client = self.client()
        if alias == CHAMPION:
            newest = max(int(mv.version) for mv in self._versions(name))
            client.set_registered_model_tag(name, FLOOR_TAG, str(newest))
        self._set_alias(name, alias, str(int(version)))
        return self.get_adapter(f"{name}/{int(version)}")

    # -- backbones

    def register_backbone(self, base: str, plan_dir: str | Path, *, run_id: str | None = None,
                          plan_hash: str | None = None, base_fingerprint: str | None = None,
                          replace: bool = False) -> RegisteredAdapter:
        """Store a base model's sharing plan folder as registered model backbone-<base>, alias champion.

        One plan per base: every task adapter of that base is trained on it, so replacing
        it orphans their champions; that takes replace=True. Without replace, a base that
        has a plan (or gets one from a racing registration) raises PlanExistsError.
        Without run_id, a run in the experiment "lisa-hub-backbones" holds the artifacts.
        """
        name = backbone_model_name(base)
        description = (f"lisa-hub sharing plan of base model {base}; alias champion = the plan "
                       "every task adapter of this base is trained on.")
        created_model = False if replace else self._claim_plan(name, description)
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
                model_description=description, version_description=f"sharing plan for {base}",
                ranking=None, candidate=False, created_model=created_model)  # a plan is not a candidate of anything: it is the plan or it is not
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

    def register_base(self, base: str, folder: str | Path, *, run_id: str,
                      base_fingerprint: str) -> RegisteredAdapter:
        """Store a base model lisa-hub trained itself (an HF folder) as registered model
        base-<base>, a new version with alias champion: what `load_base(base)` downloads on a
        node that does not have the folder."""
        name = base_model_name(base)
        description = (f"lisa-hub base model {base}, pre-trained by `lisa-hub pretrain`; alias champion = the "
                       f"weights `load_base({base!r})` loads. Its backbone is {backbone_model_name(base)}.")
        return self._register(name, Path(folder), run_id=run_id, artifact_path=BASE_ARTIFACT,
                              tags={"base_model": base, "base_fingerprint": base_fingerprint}, type_="base",
                              model_description=description, version_description=f"weights of {base}",
                              ranking=None, candidate=False)

    def get_base(self, base: str) -> Path | None:
        """The verified local folder of a registered base's champion, or None when `base` is
        not registered."""
        name = base_model_name(base)
        if self._alias_version(name, CHAMPION) is None:
            return None
        return self.resolve(f"{name}@{CHAMPION}")

    def _claim_plan(self, name: str, description: str) -> bool:
        """Return when this process may register the first plan of `name` (True when it created
        the registered model); raise PlanExistsError when a plan exists or a racing registration
        (the one whose create won) delivers one."""
        existing = self._alias_version(name, CHAMPION)
        if existing is None and self._create_model(name, "backbone", description):
            return True  # we created the registered model: the first plan is ours to register
        deadline = time.monotonic() + PLAN_WAIT_S
        while existing is None and time.monotonic() < deadline:
            time.sleep(0.5)
            existing = self._alias_version(name, CHAMPION)
        if existing is None:  # a registered model without a plan: an earlier registration died half-way
            log.warning("%s has no champion plan after %.0f s; registering ours", name, PLAN_WAIT_S)
            return False
        raise PlanExistsError(f"{name} already has a champion plan (version {existing}); pass replace=True "
                              "(CLI: --replace) to make a new plan the backbone of this base")

    # -- internals

    def _register(self, name: str, folder: Path, *, run_id: str, artifact_path: str, tags: dict[str, str],
                  type_: str, model_description: str, version_description: str,
                  ranking: list[tuple[str, bool]] | None, candidate: bool = True,
                  created_model: bool = False) -> RegisteredAdapter:
        """Log folder + manifest to the run, create a version, move the aliases. `ranking`
        None makes the new version champion unconditionally (backbone plans)."""
        if not folder.is_dir() or not any(p.is_file() for p in folder.rglob("*")):
            raise FileNotFoundError(f"artifact folder {folder} does not exist or holds no files")
        client = self.client()
        files = build_manifest(folder)
        # 1. artifacts (no registry change yet)
        with tempfile.TemporaryDirectory() as tmp:
            manifest = Path(tmp) / MANIFEST
            manifest.write_text(manifest_json(files))
            client.log_artifacts(run_id, str(folder), artifact_path)
            client.log_artifact(run_id, str(manifest), artifact_path)
        tags = {**tags, "sha256": manifest_digest(files), "artifact_path": artifact_path}

        # 2. registry: from here this registration's changes are undone on failure
        created_model = self._create_model(name, type_, model_description) or created_model
        previous = dict(client.get_registered_model(name).aliases)  # alias -> version, to restore on failure
        version = None
        try:
            version = self._create_version(name, f"runs:/{run_id}/{artifact_path}", run_id=run_id, tags=tags,
                                           description=version_description)
            if candidate:
                self._set_alias(name, CANDIDATE, version)
            if ranking is None:
                self._set_alias(name, CHAMPION, version)
            else:
                self._settle_champion(name, ranking)
            aliases = client.get_model_version(name, version).aliases
        except BaseException as err:
            self._rollback(name, version, previous, created_model, ranking)
            if not isinstance(err, Exception):  # KeyboardInterrupt & co. stay what they are
                raise
            raise RegistryError(f"registering {name} from run {run_id} failed and was rolled back: "
                                f"{err.__class__.__name__}: {err}") from err
        return RegisteredAdapter(name, int(version), tuple(sorted(aliases)))

    def _create_model(self, name: str, type_: str, description: str) -> bool:
        """Create the registered model; False when it exists (made earlier or by a racing process)."""
        from mlflow.exceptions import MlflowException

        try:
            self.client().create_registered_model(name, tags={TYPE_TAG: type_}, description=description)
            return True
        except MlflowException as err:
            if getattr(err, "error_code", "") == "RESOURCE_ALREADY_EXISTS":
                return False
            raise

    def _create_version(self, name: str, source: str, **kwargs) -> str:
        return str(self._retrying(self.client().create_model_version, name, source, **kwargs).version)

    def _set_alias(self, name: str, alias: str, version: str) -> None:
        self._retrying(self.client().set_registered_model_alias, name, alias, version)

    @staticmethod
    def _retrying(call, *args, attempts: int = 6, **kwargs):
        """`call`, retried when concurrent writers collide in MLflow's SQL store (version
        numbers are max+1, an alias is an insert-or-update: both can hit a UNIQUE constraint)."""
        from mlflow.exceptions import MlflowException

        for attempt in range(attempts):
            try:
                return call(*args, **kwargs)
            except MlflowException as err:
                text = str(err)
                if attempt == attempts - 1 or not any(s in text for s in ("UNIQUE", "IntegrityError", "locked")):
                    raise
                time.sleep(random.uniform(0.05, 0.3) * (attempt + 1))
        raise AssertionError("unreachable")

    def _settle_champion(self, name: str, ranking: list[tuple[str, bool]], *, rounds: int = 20) -> None:
        """Write `champion` until a fresh read agrees with pick_champion over the versions."""
        client = self.client()
        for _ in range(rounds):
            model = client.get_registered_model(name)
            current = model.aliases.get(CHAMPION)
            versions = {int(mv.version): mv for mv in self._versions(name)}
            floor = max(int(current or 0), int(model.tags.get(FLOOR_TAG, 0) or 0))
            champion = (int(current), versions[int(current)].tags) if current and int(current) in versions else None
            contenders = [(v, mv.tags) for v, mv in versions.items() if v > floor]
            best = pick_champion(champion, contenders, ranking)
            if best is None or str(best) == current:
                return
            self._set_alias(name, CHAMPION, str(best))
        raise RegistryError(f"{name}: champion did not settle after {rounds} rounds of concurrent registrations")

    def _rollback(self, name: str, version: str | None, previous: dict[str, str], created_model: bool,
                  ranking: list[tuple[str, bool]] | None) -> None:
        """Undo this registration only: its version, and the aliases its deletion unset."""
        client = self.client()

        def restore_aliases():
            aliases = client.get_registered_model(name).aliases
            existing = {str(mv.version) for mv in self._versions(name)}
            for alias in (CANDIDATE, CHAMPION):  # unset by deleting our version, not moved by someone else
                if alias in previous and alias not in aliases and previous[alias] in existing:
                    self._set_alias(name, alias, previous[alias])
            if ranking is not None:
                self._settle_champion(name, ranking)  # a version registered meanwhile may now be the best

        def delete_model_if_empty():
            if not self._versions(name):
                client.delete_registered_model(name)

        steps: list[tuple[str, Callable[[], object]]] = []
        if version is not None:
            steps.append((f"delete version {version}", lambda: client.delete_model_version(name, version)))
            steps.append(("restore aliases", restore_aliases))
        if created_model:
            steps.append(("delete the registered model it created", delete_model_if_empty))
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
        created = datetime.fromtimestamp((mv.creation_timestamp or 0) / 1000, tz=timezone.utc)
        return AdapterRecord(mv.name, int(mv.version), mine, dict(mv.tags), metrics_of(mv.tags), mv.run_id, created,
                             mv.source or "")


def adapter_folder(version_dir: str | Path) -> Path:
    """The adapter folder of a downloaded adapter version: artifacts/adapter of its MLflow
    model, else the folder itself (versions registered before they were MLflow models; plans)."""
    version_dir = Path(version_dir)
    return version_dir / MODEL_ADAPTER if (version_dir / "MLmodel").is_file() else version_dir


def _not_found(err) -> bool:
    return getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"
