"""Adapter kinds: the contract (this module) and one module per kind.

A backbone is a `LisaModel` (base model + sharing plan). Every kind works on it:

  lisa      (kinds/lisa.py)      per-task LiSA modules (aligners + low-rank Q/K) and LoRA parts, trained; the default
  lora      (kinds/lora.py)      LoRA on chosen linears (q_proj / v_proj by default), PEFT's keys, a baseline
  attn_drop (kinds/attn_drop.py) a training-free structural plan (layers dropped); no tensors

Each kind declares its capabilities, so callers decide before loading anything:
`trainable` (a job can train it), `batches_per_row` (rows of different adapters of this
kind decode in one batch: serving takes it), `composes_with_sharing` (it runs on a LiSA
backbone's shared layers), `needs_plan` (it fits only the plan it was made on).

Third-party kinds register through the entry-point group `lisa_hub.adapter_kinds` (an
object with the attributes and methods of `AdapterKind`); built-ins are found without it.
Everything that accepts kinds (the adaptation job, the SDK, the CLI) asks this module:
`trainable_kinds()` are the kinds a job can train. Every adapter folder holds
`adapter_config.json`; lisa-hub's metadata (at least `kind`, `base_fingerprint`, and
`plan_hash` for kinds that depend on the plan; loading checks both) is that file, or, for
a `lora` adapter, the side file `lisa_hub.json` beside PEFT's own `adapter_config.json`
(PEFT ignores it). `read_config` reads either, and a plain PEFT LoRA folder as well. Per-model state of a kind lives on
the model, under the kind's name (`kind_state(lm, kind)`), and goes with it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from adapters_hub.lisa.model import LisaModel

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
METADATA_NAME = "lisa_hub.json"  # lisa-hub's metadata beside a PEFT-format adapter_config.json
ENTRY_POINT_GROUP = "lisa_hub.adapter_kinds"


from adapters_hub.errors import AdapterError, AdapterMismatchError  # noqa: F401  (re-exported)


class AdapterKind(Protocol):
    name: str
    trainable: bool              # a job can train it (then `prefix` names its tensors)
    prefix: str                  # parameter-name prefix of its tensors, e.g. "lisa_"; "" if it has none
    needs_plan: bool             # an adapter only fits backbones with the sharing plan it was made on
    batches_per_row: bool        # rows of different adapters of this kind decode in one batch
    composes_with_sharing: bool  # it runs on a LiSA backbone (shared layers) as well as on a dense one

    def add(self, lm: "LisaModel", adapter_name: str, options: dict) -> None:
        """Create a fresh adapter under `adapter_name`; only its tensors require grad."""

    def profile_options(self, profile: dict) -> dict:
        """The `add` options a task profile asks for (trainable kinds)."""

    def save(self, lm: "LisaModel", adapter_name: str, directory: Path) -> Path: ...

    def load(self, lm: "LisaModel", directory: Path, adapter_name: str) -> None:
        """Load a saved adapter under `adapter_name` (not activated). Refuses a mismatch."""

    def activate(self, lm: "LisaModel", adapter_name: str) -> None: ...

    def deactivate(self, lm: "LisaModel", adapter_name: str) -> None: ...

    def delete(self, lm: "LisaModel", adapter_name: str) -> None: ...


def kind_state(lm, kind: str) -> dict:
    """The per-model state of a kind (e.g. LoRA options per adapter), kept on the model."""
    store = lm.__dict__.setdefault("_kind_state", {})
    return store.setdefault(kind, {})


def only_trainable(lm, kind: "AdapterKind", adapter_name: str) -> None:
    """requires_grad on exactly the tensors of `adapter_name` of `kind`."""
    for name, p in lm.named_parameters():
        parts = name.split(".")
        p.requires_grad_(bool(kind.prefix) and any(part.startswith(kind.prefix) and parts[i + 1] == adapter_name
                                                   for i, part in enumerate(parts[:-1])))


def read_config(directory: str | Path) -> dict:
    """lisa-hub's config of an adapter folder: `lisa_hub.json` when the folder has one (a
    PEFT-format `lora` adapter of ours), else `adapter_config.json`; a plain PEFT LoRA
    folder (`peft_type: LORA`, no lisa-hub metadata) reads as a `lora` config without a
    base fingerprint (`"format": "peft"`). Clear errors for a broken folder."""
    directory = Path(directory)
    path = directory / METADATA_NAME
    if not path.is_file():
        path = directory / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{directory}: not an adapter folder (no {CONFIG_NAME})")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"{path}: corrupted adapter config ({err})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: an adapter config is a JSON object")
    if "kind" not in config and path.name == CONFIG_NAME and config.get("peft_type") == "LORA":
        from adapters_hub.kinds.lora import config_from_peft

        return config_from_peft(config, path)
    if "kind" not in config:
        raise AdapterError(f"{path}: field 'kind' is missing")
    return config


def check_compatible(config: dict, lm: "LisaModel", where: str, *, needs_plan: bool) -> None:
    if config.get("base_fingerprint") != lm.base_fingerprint:
        raise AdapterMismatchError(
            f"{where}: adapter was made for base {config.get('base_model')!r} (fingerprint "
            f"{config.get('base_fingerprint')}), this backbone is {lm.base_name!r} ({lm.base_fingerprint})")
    if needs_plan and config.get("plan_hash") != lm.plan.hash:
        raise AdapterMismatchError(
            f"{where}: adapter was made for sharing plan {config.get('plan_hash')}, this backbone uses {lm.plan.hash}")


# ----------------------------------------------------------------------------- registry

_BUILTIN = {"lisa": "adapters_hub.kinds.lisa:LisaKind", "lora": "adapters_hub.kinds.lora:LoraKind",
            "attn_drop": "adapters_hub.kinds.attn_drop:AttnDropKind"}
_instances: dict[str, AdapterKind] = {}


def get_kind(name: str) -> AdapterKind:
    """The kind object for `name`: a built-in, or one from the entry-point group."""
    if name not in _instances:
        builtin = _BUILTIN.get(name)
        if builtin is not None:
            import importlib

            module, _, attr = builtin.partition(":")
            factory = getattr(importlib.import_module(module), attr)
        else:
            from importlib.metadata import entry_points

            found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
            if not found:
                raise AdapterError(f"unknown adapter kind {name!r}; known: {', '.join(known_kinds())}")
            factory = found[0].load()
        _instances[name] = factory() if isinstance(factory, type) else factory
    return _instances[name]


def known_kinds() -> list[str]:
    from importlib.metadata import entry_points

    return sorted(set(_BUILTIN) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def trainable_kinds() -> list[str]:
    """The kinds a job can train (built-in first: lisa, lora, then registered ones)."""
    names = [n for n in ("lisa", "lora") if n in _BUILTIN] + [n for n in known_kinds() if n not in _BUILTIN]
    return [n for n in names if getattr(get_kind(n), "trainable", False)]


def batching_kinds() -> list[str]:
    """The kinds whose adapters decode row by row in one mixed batch (what serving takes)."""
    return [n for n in known_kinds() if getattr(get_kind(n), "batches_per_row", False)]
