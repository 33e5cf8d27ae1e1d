"""`lora` adapters are PEFT LoRA folders: PEFT opens ours with the same logits, we open
PEFT's, the layout is what PEFT itself writes, and what we cannot run is refused clearly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from adapters_hub.backbone import dense_plan, load_lisa_model
from adapters_hub.kinds import AdapterError, AdapterMismatchError, get_kind, read_config
from adapters_hub.lisa.plan import SharingPlan
from adapters_hub.models import base_config, load_base

IDS = torch.tensor([[5, 17, 99, 3, 42, 7, 64, 11]])


def _dense():
    lm, _ = load_lisa_model("tiny-llama", dense_plan("tiny-llama"))
    return lm.eval()


def _randomise_b(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _ours(tmp_path, targets=("q_proj", "v_proj", "mlp")):
    lm, kind = _dense(), get_kind("lora")
    kind.add(lm, "t", {"r": 4, "lora_alpha": 8, "target_modules": list(targets)})
    _randomise_b(lm)
    kind.activate(lm, "t")
    with torch.no_grad():
        logits = lm(input_ids=IDS).logits
    kind.save(lm, "t", tmp_path / "ours")
    return tmp_path / "ours", logits


def test_peft_opens_our_lora_adapter_with_the_same_logits(tmp_path):
    from peft import PeftModel

    folder, ours = _ours(tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "q_proj", "up_proj", "v_proj"]
    assert config["base_model_name_or_path"] == "tiny-llama" and "kind" not in config
    assert read_config(folder)["kind"] == "lora" and read_config(folder)["base_fingerprint"]
    peft_model = PeftModel.from_pretrained(load_base("tiny-llama")[0], str(folder)).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=IDS).logits
    base = load_base("tiny-llama")[0].eval()
    with torch.no_grad():
        plain = base(input_ids=IDS).logits
    assert (ours - plain).abs().max() > 1e-3  # the adapter changes the output ...
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)  # ... and PEFT computes the same


def test_our_folder_has_the_layout_and_keys_peft_itself_writes(tmp_path):
    from peft import LoraConfig, get_peft_model

    folder, _ = _ours(tmp_path)
    peft_model = get_peft_model(load_base("tiny-llama")[0], LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM"))
    peft_model.save_pretrained(str(tmp_path / "peft"))
    theirs = {p.name for p in (tmp_path / "peft").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= theirs
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in folder.iterdir()}
    a, b = load_file(str(folder / "adapter_model.safetensors")), load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    ours, peft_cfg = (json.loads((d / "adapter_config.json").read_text()) for d in (folder, tmp_path / "peft"))
    for field in ("peft_type", "r", "lora_alpha", "task_type", "bias", "fan_in_fan_out", "use_dora", "use_rslora"):
        assert ours[field] == peft_cfg[field], field
    assert sorted(ours["target_modules"]) == sorted(peft_cfg["target_modules"])


def test_we_open_a_plain_peft_lora_folder_on_the_dense_backbone_with_peft_logits(tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(load_base("tiny-llama")[0], LoraConfig(
        r=2, lora_alpha=4, target_modules=["k_proj", "o_proj"], lora_dropout=0.1, task_type="CAUSAL_LM"))
    _randomise_b(peft_model, seed=3)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    peft_model.eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=IDS).logits
    lm, kind = _dense(), get_kind("lora")
    kind.load(lm, tmp_path / "peft", "p")
    kind.activate(lm, "p")
    with torch.no_grad():
        ours = lm(input_ids=IDS).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # ... and saving it again writes lisa-hub's metadata beside PEFT's config
    kind.save(lm, "p", tmp_path / "again")
    assert read_config(tmp_path / "again")["base_fingerprint"] == lm.base_fingerprint


def test_a_plain_peft_folder_is_refused_by_a_sharing_backbone_and_unsupported_options_name_the_field(tmp_path):
    from peft import LoraConfig, get_peft_model

    get_peft_model(load_base("tiny-llama")[0], LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        str(tmp_path / "peft"))
    plan = SharingPlan.for_config(base_config("tiny-llama"), [2, 4])
    lm, _ = load_lisa_model("tiny-llama", plan)
    with pytest.raises(AdapterMismatchError, match="fits only the dense backbone"):
        get_kind("lora").load(lm, tmp_path / "peft", "p")
    config_path = tmp_path / "peft" / "adapter_config.json"
    for field, value in (("use_dora", True), ("target_modules", "all-linear"), ("bias", "all")):
        config = json.loads(config_path.read_text())
        config[field] = value
        config_path.write_text(json.dumps(config))
        with pytest.raises(AdapterError, match=field):
            read_config(tmp_path / "peft")
        config_path.write_text(json.dumps({**config, field: {"use_dora": False, "target_modules": ["q_proj"],
                                                             "bias": "none"}[field]}))
