"""The `lisa` kind: per-task LiSA modules (head aligners + low-rank Q/K) on a LiSA backbone,
and LoRA parts: low-rank updates of chosen linears (`adapters_hub.multi_lora`), so that a
task adapter changes what the model computes from the attention, not only the attention.
All of it is one adapter: one folder, one registry entry, routed per row when served."""

from __future__ import annotations

from adapters_hub.kinds import only_trainable
from adapters_hub.multi_lora import LoraParts

# The LoRA parts a profile gets when it names none (lora_rank / lora_targets unset), and
# beside them only the aligners train (the general adapter's low-rank Q/K stay): the
# combination that won on GSM8K within the trainable size of a LiSA-only adapter (SmolLM2,
# 60% plan: 1,239,858 vs 1,245,618 parameters, answer NLL 1.259 vs 1.325;
# benchmarks/gsm8k_adapters.py, README).
DEFAULT_PARTS = LoraParts(r=5, targets=("o_proj", "v_proj", "mlp"))


def default_lisa_tensors(from_general_adapter: bool) -> str:
    """Which LiSA tensors of a task adapter train when the profile does not say: the
    aligners only when it starts from a general adapter (whose Q/K are already fitted),
    all of them on a fresh backbone (fresh Q/K are zero)."""
    return "aligner" if from_general_adapter else "all"


class LisaKind:
    """Native LiSA adapters: LisaModel already keeps them per name."""

    name = "lisa"
    trainable = True
    prefix = "lisa_"
    needs_plan = True
    batches_per_row = True        # one adapter per row: LisaAttention routes rows by name
    composes_with_sharing = True

    def add(self, lm, adapter_name, options):
        from dataclasses import replace

        config = replace(next(iter(lm.peft_config.values())), **options)
        lm.add_adapter(adapter_name, config)
        only_trainable(lm, self, adapter_name)

    def profile_options(self, profile: dict) -> dict:
        """`add` options from a task profile's lora_rank / lora_targets (0: no LoRA parts)."""
        rank, targets = profile.get("lora_rank"), profile.get("lora_targets")
        if rank == 0:
            return {"lora_parts": None}
        return {"lora_parts": LoraParts(r=rank or DEFAULT_PARTS.r, targets=tuple(targets or DEFAULT_PARTS.targets))}

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
