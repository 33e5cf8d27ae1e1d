"""The `lora` kind: LoRA on chosen linears of the backbone, one per adapter name, any mix per row.

The updates live in `adapters_hub.multi_lora` (per-row routing, so serving batches LoRA
adapters with every other kind). A saved adapter is a PEFT LoRA folder, as
`PeftModel.save_pretrained` writes it: `adapter_config.json` (`peft_type: LORA`, r,
lora_alpha, target_modules, base_model_name_or_path) and `adapter_model.safetensors` with
PEFT's key names (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), so
`PeftModel.from_pretrained` and vLLM's `--lora-modules` open it; lisa-hub's metadata (kind,
base fingerprint, plan hash) is the side file `lisa_hub.json`. Plain PEFT LoRA folders load
too (on the dense backbone only: they name no plan), and so do older lisa-hub folders. The LiSA layers of a `lora` row run on the backbone's own
adapter (`LisaModel.base_adapter`: the general adapter of a converted backbone, else the
fresh one), so a LoRA adapter is comparable to a LiSA one trained on the same backbone;
on the dense backbone it is plain LoRA on the base.
"""

from __future__ import annotations

import json
from pathlib import Path

from adapters_hub import multi_lora
from adapters_hub.kinds import (METADATA_NAME, WEIGHTS_NAME, AdapterError, AdapterMismatchError, check_compatible,
                                kind_state, only_trainable, read_config)

PEFT_PREFIX = "base_model.model."  # PEFT's saved keys: this + the base model's own parameter name
# PEFT LoraConfig fields whose non-default values this kind cannot run (field -> default)
_PEFT_UNSUPPORTED = {"use_dora": False, "use_rslora": False, "bias": "none", "fan_in_fan_out": False,
                     "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None}


class LoraKind:
    name = "lora"
    trainable = True
    prefix = "lora_"
    needs_plan = True
    batches_per_row = True        # multi_lora gathers each row's update by adapter
    composes_with_sharing = True
    defaults = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}

    def add(self, lm, adapter_name, options):
        options = {**self.defaults, **options}
        if options.get("lora_dropout"):
            raise AdapterError(f"lora_dropout: {options['lora_dropout']} is not supported (0 only)")
        parts = multi_lora.LoraParts(r=int(options["r"]), alpha=float(options["lora_alpha"]),
                                     targets=tuple(options["target_modules"]))
        multi_lora.add(lm.get_base_model(), adapter_name, parts, prefix=self.prefix)
        kind_state(lm, self.name)[adapter_name] = options
        only_trainable(lm, self, adapter_name)

    def profile_options(self, profile: dict) -> dict:
        """`add` options from a task profile's lora_rank / lora_targets (alpha stays 2 r)."""
        rank, targets = profile.get("lora_rank") or self.defaults["r"], profile.get("lora_targets")
        return {"r": rank, "lora_alpha": 2 * rank, "target_modules": list(targets or self.defaults["target_modules"])}

    def save(self, lm, adapter_name, directory):
        from peft import LoraConfig
        from safetensors.torch import save_file

        from adapters_hub.models import hub_id

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        options = kind_state(lm, self.name)[adapter_name]
        tensors = {PEFT_PREFIX + _drop_name(k, adapter_name): v.detach().cpu().contiguous()
                   for k, v in lm.get_base_model().state_dict().items() if _is_ours(k, adapter_name)}
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        projections = multi_lora.LoraParts(r=int(options["r"]), targets=tuple(options["target_modules"])).projections
        LoraConfig(r=int(options["r"]), lora_alpha=options["lora_alpha"], target_modules=sorted(projections),
                   lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                   base_model_name_or_path=hub_id(lm.base_name)).save_pretrained(str(directory))
        metadata = {"kind": self.name, "format": "peft", "base_model": lm.base_name,
                    "base_fingerprint": lm.base_fingerprint, "plan_hash": lm.plan.hash, "lora": options}
        (directory / METADATA_NAME).write_text(json.dumps(metadata, indent=2))
        return directory

    def load(self, lm, directory, adapter_name):
        from safetensors.torch import load_file

        config = read_config(directory)
        if "base_fingerprint" in config:
            check_compatible(config, lm, str(directory), needs_plan=True)
        elif lm.plan.shared or lm.plan.dropped:  # a plain PEFT adapter: trained on the dense base, it names no plan
            raise AdapterMismatchError(
                f"{directory}: a PEFT LoRA adapter without lisa-hub metadata fits only the dense backbone "
                f"(attention='dense'); this backbone shares {len(lm.plan.shared)} layers and drops the attention "
                f"of {len(lm.plan.dropped)}")
        try:
            tensors = load_file(str(Path(directory) / WEIGHTS_NAME))
        except Exception as err:
            raise AdapterError(f"{directory}: corrupted {WEIGHTS_NAME} ({err})") from None
        self.add(lm, adapter_name, config["lora"])
        state = {_insert_name(k.removeprefix(PEFT_PREFIX), adapter_name): v for k, v in tensors.items()}
        if lm.pruned:  # LoRA on a pruned projection (lm.idle_projections) never ran: nothing to load there
            pruned = tuple(f"layers.{i}.self_attn.{proj}." for i, proj in lm.idle_projections())
            state = {k: v for k, v in state.items() if not any(p in k for p in pruned)}
        own = {k for k in lm.get_base_model().state_dict() if _is_ours(k, adapter_name)}
        if set(state) != own:
            self.delete(lm, adapter_name)
            missing, extra = sorted(own - set(state)), sorted(set(state) - own)
            raise AdapterError(f"{directory}: tensors do not fit this backbone: missing {missing[:2]}, "
                               f"unexpected {extra[:2]}")
        try:
            lm.get_base_model().load_state_dict(state, strict=False)
        except RuntimeError as err:  # shapes that do not fit: leave nothing half-loaded
            self.delete(lm, adapter_name)
            raise AdapterError(f"{directory}: tensors do not fit this backbone ({str(err)[:300]})") from None
        multi_lora.changed(lm.get_base_model())
        for p in lm.get_base_model().parameters():
            p.requires_grad_(False)

    def activate(self, lm, adapter_name):
        if lm.active_adapter != lm.base_adapter:  # the LiSA layers run the backbone's own adapter
            lm.set_adapter(lm.base_adapter)
        multi_lora.router_of(lm.get_base_model()).active[self.name] = adapter_name

    def deactivate(self, lm, adapter_name):
        multi_lora.router_of(lm.get_base_model()).active[self.name] = None

    def delete(self, lm, adapter_name):
        multi_lora.delete(lm.get_base_model(), adapter_name)
        kind_state(lm, self.name).pop(adapter_name, None)


def _is_ours(key: str, adapter_name: str) -> bool:
    parts = key.split(".")
    return any(p in ("lora_A", "lora_B") and parts[i + 1] == adapter_name for i, p in enumerate(parts[:-1]))


def _drop_name(key: str, adapter_name: str) -> str:
    # "...q_proj.lora_A.<name>.weight" -> "...q_proj.lora_A.weight" (PEFT's saved key names)
    return key.replace(f".lora_A.{adapter_name}.", ".lora_A.").replace(f".lora_B.{adapter_name}.", ".lora_B.")


def _insert_name(key: str, adapter_name: str) -> str:
    # "...q_proj.lora_A.weight" -> "...q_proj.lora_A.<name>.weight"
    head, _, leaf = key.rpartition(".")
    return f"{head}.{adapter_name}.{leaf}"


def config_from_peft(peft: dict, path: Path) -> dict:
    """lisa-hub's config for a plain PEFT LoRA folder's adapter_config.json (no fingerprint:
    `load` accepts it on the dense backbone only). Refuses what this kind cannot run; the
    dropout only matters in training and is dropped."""
    for field, default in _PEFT_UNSUPPORTED.items():
        if peft.get(field) not in (None, default):
            raise AdapterError(f"{path}: {field}: {peft[field]!r} is not supported (only {default!r})")
    targets = peft.get("target_modules")
    if isinstance(targets, str) or not targets or any(t not in multi_lora.PROJECTIONS for t in targets):
        raise AdapterError(f"{path}: target_modules: {targets!r}; supported: a list of "
                           f"{', '.join(multi_lora.PROJECTIONS)}")
    if not isinstance(peft.get("r"), int) or peft["r"] < 1:
        raise AdapterError(f"{path}: r: must be a positive integer, got {peft.get('r')!r}")
    return {"kind": "lora", "format": "peft", "base_model": peft.get("base_model_name_or_path"),
            "lora": {"r": peft["r"], "lora_alpha": peft.get("lora_alpha", 8), "target_modules": sorted(targets),
                     "lora_dropout": 0.0}}
