"""Adapter kinds: how one kind of adapter is built, saved, loaded and switched on a backbone.

A backbone is a `LisaModel` (base model + sharing plan). Every kind works on it:

  lisa      per-task LiSA modules (aligners + low-rank Q/K), trained; the default
  lora      PEFT LoRA on q_proj / v_proj of the backbone (fresh aligned sharing), a baseline
  attn_drop a training-free structural plan (layers dropped); no tensors

Third-party kinds register through the entry-point group `lisa_hub.adapter_kinds` (an
object with the attributes and methods of `AdapterKind`); built-ins are found without it.
Everything that accepts kinds (the adaptation job, the SDK, the CLI) asks this module:
`trainable_kinds()` are the kinds a job can train. Every adapter folder holds
`adapter_config.json` with at least `kind`, `base_fingerprint`; kinds that depend on the
plan also hold `plan_hash`, and loading checks both. Per-model state of a kind lives on
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
ENTRY_POINT_GROUP = "lisa_hub.adapter_kinds"


from adapters_hub.errors import AdapterError, AdapterMismatchError  # noqa: F401  (re-exported)


class AdapterKind(Protocol):
    name: str
    trainable: bool     # a job can train it (then `prefix` names its tensors)
    prefix: str         # parameter-name prefix of its tensors, e.g. "lisa_"; "" if it has none
    needs_plan: bool    # an adapter only fits backbones with the sharing plan it was made on

    def add(self, lm: "LisaModel", adapter_name: str, options: dict) -> None:
        """Create a fresh adapter under `adapter_name`; only its tensors require grad."""

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
    tag = f".{adapter_name}."
    for name, p in lm.named_parameters():
        p.requires_grad_(bool(kind.prefix) and kind.prefix in name and tag in name)


def read_config(directory: str | Path) -> dict:
    """adapter_config.json of an adapter folder, with clear errors for a broken folder."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{directory}: not an adapter folder (no {CONFIG_NAME})")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"{path}: corrupted adapter config ({err})") from None
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


# ----------------------------------------------------------------------------- lisa


class LisaKind:
    """Native LiSA adapters: LisaModel already keeps them per name."""

    name = "lisa"
    trainable = True
    prefix = "lisa_"
    needs_plan = True

    def add(self, lm, adapter_name, options):
        from dataclasses import replace

        config = replace(next(iter(lm.peft_config.values())), **options)
        lm.add_adapter(adapter_name, config)
        only_trainable(lm, self, adapter_name)

    def save(self, lm, adapter_name, directory):
        return lm.save_adapter(directory, adapter_name)

    def load(self, lm, directory, adapter_name):
        lm.load_adapter(directory, adapter_name)

    def activate(self, lm, adapter_name):
        lm.set_adapter(adapter_name)

    def deactivate(self, lm, adapter_name):
        pass  # the next activate replaces it; LiSA layers always need some adapter

    def delete(self, lm, adapter_name):
        lm.delete_adapter(adapter_name)


# ----------------------------------------------------------------------------- lora


class LoraKind:
    """PEFT LoRA injected into the backbone's modules (no PeftModel wrapper), one per name.

    The LiSA layers stay on the backbone's fresh adapter (aligned direct sharing), so a
    LoRA adapter is comparable to a LiSA one trained on the same backbone."""

    name = "lora"
    trainable = True
    prefix = "lora_"
    needs_plan = True
    defaults = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}

    def add(self, lm, adapter_name, options):
        from peft import LoraConfig, inject_adapter_in_model

        options = {**self.defaults, **options}
        inject_adapter_in_model(LoraConfig(**options), lm.get_base_model(), adapter_name=adapter_name)
        kind_state(lm, self.name)[adapter_name] = options
        only_trainable(lm, self, adapter_name)
        self.activate(lm, adapter_name)

    def save(self, lm, adapter_name, directory):
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tag = f".{adapter_name}."
        tensors = {k.replace(tag, "."): v.detach().cpu().contiguous()
                   for k, v in lm.get_base_model().state_dict().items() if "lora_" in k and tag in k}
        save_file(tensors, str(directory / WEIGHTS_NAME))
        config = {"kind": self.name, "base_model": lm.base_name, "base_fingerprint": lm.base_fingerprint,
                  "plan_hash": lm.plan.hash, "lora": kind_state(lm, self.name)[adapter_name]}
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        return directory

    def load(self, lm, directory, adapter_name):
        from safetensors.torch import load_file

        config = read_config(directory)
        check_compatible(config, lm, str(directory), needs_plan=True)
        try:
            tensors = load_file(str(Path(directory) / WEIGHTS_NAME))
        except Exception as err:
            raise AdapterError(f"{directory}: corrupted {WEIGHTS_NAME} ({err})") from None
        self.add(lm, adapter_name, config["lora"])
        state = {_insert_name(k, adapter_name): v for k, v in tensors.items()}
        if lm.pruned:  # LoRA on a pruned W_q/W_k of a substituted layer never ran: nothing to load there
            pruned = tuple(f"layers.{i}.self_attn.{proj}." for i in lm.lisa_layers for proj in ("q_proj", "k_proj"))
            state = {k: v for k, v in state.items() if not any(p in k for p in pruned)}
        missing = set(state) - set(lm.get_base_model().state_dict())
        if missing:
            self.delete(lm, adapter_name)
            raise AdapterError(f"{directory}: tensors do not fit this backbone: {sorted(missing)[:3]}")
        lm.get_base_model().load_state_dict(state, strict=False)
        for p in lm.get_base_model().parameters():
            p.requires_grad_(False)

    def activate(self, lm, adapter_name):
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in lm.get_base_model().modules():
            if isinstance(module, BaseTunerLayer):
                module.enable_adapters(True)
                module.set_adapter(adapter_name)

    def deactivate(self, lm, adapter_name):
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in lm.get_base_model().modules():
            if isinstance(module, BaseTunerLayer):
                module.enable_adapters(False)

    def delete(self, lm, adapter_name):
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in lm.get_base_model().modules():
            if isinstance(module, BaseTunerLayer) and adapter_name in module.lora_A:
                module.delete_adapter(adapter_name)
        kind_state(lm, self.name).pop(adapter_name, None)


def _insert_name(key: str, adapter_name: str) -> str:
    # "...q_proj.lora_A.weight" -> "...q_proj.lora_A.<name>.weight"
    head, _, leaf = key.rpartition(".")
    return f"{head}.{adapter_name}.{leaf}"


# ----------------------------------------------------------------------------- attn_drop


class AttnDropKind:
    """A training-free drop plan; activating applies it, deactivating restores the layers."""

    name = "attn_drop"
    trainable = False
    prefix = ""
    needs_plan = False

    def add(self, lm, adapter_name, options):
        raise AdapterError("attn_drop adapters are made by `lisa-hub drop`, not trained; load one instead")

    def save(self, lm, adapter_name, directory):
        return kind_state(lm, self.name)[adapter_name].save(directory)

    def load(self, lm, directory, adapter_name):
        from adapters_hub.drop.model import DropAdapter

        config = read_config(directory)
        check_compatible(config, lm, str(directory), needs_plan=False)
        kind_state(lm, self.name)[adapter_name] = DropAdapter.load(directory)

    def activate(self, lm, adapter_name):
        # `load` checked the adapter against the backbone's fingerprint; the live model's own
        # fingerprint differs once W_q/W_k are pruned or healing is merged, so not again here.
        kind_state(lm, self.name)[adapter_name].activate(lm.get_base_model(), check=False)

    def deactivate(self, lm, adapter_name):
        kind_state(lm, self.name)[adapter_name].deactivate(lm.get_base_model())

    def delete(self, lm, adapter_name):
        kind_state(lm, self.name).pop(adapter_name, None)


# ----------------------------------------------------------------------------- registry

_BUILTIN = {"lisa": LisaKind, "lora": LoraKind, "attn_drop": AttnDropKind}
_instances: dict[str, AdapterKind] = {}


def get_kind(name: str) -> AdapterKind:
    """The kind object for `name`: a built-in, or one from the entry-point group."""
    if name not in _instances:
        factory = _BUILTIN.get(name)
        if factory is None:
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
