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
    reg.register_base("bytes-6l-lisa50", hf_dir, ...) ; reg.get_base("bytes-6l-lisa50") -> Path | None  # pre-trained

The module-level functions of the same names use one cached Registry per tracking URI
(settings.mlflow_uri() by default).

Modules: `refs` (names and refs), `manifest` (sha256 integrity of registered folders),
`champion` (the pure champion policy), `store` (the client: registration that is atomic
against concurrent registrations, resolution, listing), `errors`.
"""

from __future__ import annotations

import functools
from pathlib import Path

from adapters_hub.registry.champion import TOLERANCE, beats, pick_champion
from adapters_hub.registry.errors import (
    AdapterNotFoundError,
    ChecksumError,
    PlanExistsError,
    RegistryError,
    RegistryUnavailableError,
)
from adapters_hub.registry.manifest import MANIFEST, build_manifest, manifest_digest, verify_folder
from adapters_hub.registry.refs import (CANDIDATE, CHAMPION, adapter_model_name, backbone_model_name,
                                       base_model_name, parse_ref)
from adapters_hub.registry.store import (
    ADAPTER_ARTIFACT,
    BACKBONE_ARTIFACT,
    TYPE_TAG,
    AdapterRecord,
    RegisteredAdapter,
    Registry,
)

__all__ = [
    "ADAPTER_ARTIFACT", "BACKBONE_ARTIFACT", "CANDIDATE", "CHAMPION", "MANIFEST", "TOLERANCE", "TYPE_TAG",
    "AdapterNotFoundError", "AdapterRecord", "ChecksumError", "PlanExistsError", "RegisteredAdapter", "Registry",
    "RegistryError", "RegistryUnavailableError", "adapter_model_name", "backbone_model_name", "base_model_name",
    "beats",
    "build_manifest", "for_uri", "get_adapter", "get_backbone", "get_base", "list_adapters", "manifest_digest", "parse_ref",
    "pick_champion", "promote", "register_adapter", "register_backbone", "resolve", "verify_folder",
]


@functools.lru_cache(maxsize=8)
def _registry(tracking_uri: str) -> Registry:
    return Registry(tracking_uri)


def for_uri(tracking_uri: str | None = None) -> Registry:
    """One Registry (one client, one health probe) per tracking URI for module-level calls."""
    from adapters_hub import settings

    return _registry(tracking_uri or settings.mlflow_uri())


def register_adapter(*, tracking_uri: str | None = None, **kwargs) -> RegisteredAdapter:
    return for_uri(tracking_uri).register_adapter(**kwargs)


def resolve(ref: str, *, tracking_uri: str | None = None) -> Path:
    return for_uri(tracking_uri).resolve(ref)


def get_adapter(ref: str, *, tracking_uri: str | None = None) -> AdapterRecord:
    return for_uri(tracking_uri).get_adapter(ref)


def list_adapters(task: str | None = None, *, tracking_uri: str | None = None) -> list[AdapterRecord]:
    return for_uri(tracking_uri).list_adapters(task)


def promote(name: str, version: int | str, alias: str = CHAMPION, *, tracking_uri: str | None = None) -> AdapterRecord:
    return for_uri(tracking_uri).promote(name, version, alias)


def register_backbone(base: str, plan_dir: str | Path, *, tracking_uri: str | None = None, **kwargs) -> RegisteredAdapter:
    return for_uri(tracking_uri).register_backbone(base, plan_dir, **kwargs)


def get_backbone(base: str, *, tracking_uri: str | None = None) -> Path | None:
    return for_uri(tracking_uri).get_backbone(base)


def get_base(base: str, *, tracking_uri: str | None = None) -> Path | None:
    return for_uri(tracking_uri).get_base(base)
