"""Which conversion objective heals a LiSA backbone best: one run, one table.

    LISA_HUB_DATA_DIR=../shared/data .venv/bin/python benchmarks/objectives_smollm2.py \
        [--fraction 0.6] [--minutes 3] [--sensitivity-cache runs/sensitivity-smollm2.json]
        [--choose-by analysis] [--heal-lrs 2e-4,1e-3,4e-3]

Same plan (the --fraction least sensitive layers after local initialisation), same local
initialisation, same wall-clock budget for every row; rows differ only in what trains
(LiSA tensors alone, or with healing) and in the objective's weights. The choice is made
on the *dev* blocks (calibration blocks 8-15: never trained on, not the reported eval);
the eval blocks (first 8 x 1024 WikiText-2 test tokens) are printed beside them. The
held-out tail of WikiText-2 is never read.
"""

from __future__ import annotations

import argparse
import time

COMBOS = {  # name: (healing?, Objective fields, (batch, sequence length))
    "lisa only, KD T=1, 4 x 256": (False, {}, (4, 256)),
    "healed, KD T=1, 4 x 256": (True, {}, (4, 256)),
    "healed, KD T=2, 4 x 256": (True, {"kd_temperature": 2.0}, (4, 256)),
    "healed, KD T=2, 1 x 1024": (True, {"kd_temperature": 2.0}, (1, 1024)),
    "healed, KD T=2 + hidden 1, 1 x 1024": (True, {"kd_temperature": 2.0, "hidden_weight": 1.0}, (1, 1024)),
    "healed, KD T=1, 1 x 1024": (True, {}, (1, 1024)),
    "healed, KD T=2 + attn 0.1 + LM 0.1, 1 x 1024": (True, {"kd_temperature": 2.0, "attn_weight": 0.1,
                                                             "lm_weight": 0.1}, (1, 1024)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--fraction", type=float, default=0.6)
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--combos", default=",".join(str(i) for i in range(len(COMBOS))), help="indices into COMBOS")
    ap.add_argument("--heal-rank", type=int, default=8)
    ap.add_argument("--heal-lr", type=float, default=4e-3)
    ap.add_argument("--heal-lrs", default=None,
                    help="comma-separated healing learning rates: every healed combo runs once per rate")
    ap.add_argument("--choose-by", default="sensitivity", choices=("sensitivity", "analysis"),
                    help="the plan's layers: least sensitive after local init (a ~9 CPU-min scan unless "
                         "cached) or by attention analysis (seconds)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--sensitivity-cache", default=None)
    args = ap.parse_args()

    import torch

    from adapters_hub.evaluation import perplexity
    from adapters_hub.lisa import LisaConfig, LisaModel, SharingPlan, healing
    from adapters_hub.lisa.convert import Objective, self_distill, token_split
    from adapters_hub.lisa.local_init import local_init
    from adapters_hub.lisa.plan import choose_layers
    from adapters_hub.models import fingerprint, load_base
    from benchmarks.convert_smollm2 import sensitivities

    t0 = time.perf_counter()
    model, tok = load_base(args.base)
    fp = fingerprint(model)
    split = token_split(tok)
    dev = split.calib[8:]
    if args.choose_by == "analysis":
        from adapters_hub.lisa import analyze_attention

        report = analyze_attention(model, [split.calib[i : i + 1] for i in range(4)], progress=False, base=args.base)
        layers = list(SharingPlan.from_report(report, fraction=args.fraction).layers)
    else:
        report, calib_ppl, sens = sensitivities(model, split, args.base, cache=args.sensitivity_cache)
        layers = choose_layers(sens, num_layers=report.num_layers, fraction=args.fraction)
    plan = SharingPlan.from_layers(report, layers)
    base_dev, base_eval = perplexity(model, dev, progress=False), perplexity(model, split.eval, progress=False)
    print(f"plan {layers}; base dev {base_dev:.2f}, eval {base_eval:.2f}", flush=True)
    lm = LisaModel(model, LisaConfig(plan=plan), fingerprint=fp)
    local_init(lm, split.calib, steps=150, log=None)
    init_state = {k: v.clone() for k, v in lm.adapter_state_dict().items()}
    init_dev, init_eval = perplexity(lm, dev, progress=False), perplexity(lm, split.eval, progress=False)
    rows = [("local init only", 0, init_dev, init_eval, 0)]
    names = list(COMBOS)
    heal_lrs = [float(x) for x in args.heal_lrs.split(",")] if args.heal_lrs else [args.heal_lr]
    runs = [(names[int(c)], lr) for c in args.combos.split(",")
            for lr in (heal_lrs if COMBOS[names[int(c)]][0] else [None])]
    for name, heal_lr in runs:
        heal, fields, (batch, seq) = COMBOS[name]
        if heal and len(heal_lrs) > 1:
            name = f"{name}, heal lr {heal_lr:g}"
        with torch.no_grad():
            for k, v in lm.adapter_state_dict().items():
                v.copy_(init_state[k])
        torch.manual_seed(0)
        if heal:
            healing.attach(lm.model, healing.HealingConfig(rank=args.heal_rank), shared_layers=plan.layers)
        train = split.train if seq == split.train.shape[1] else token_split(tok, train_len=seq).train
        state = self_distill(lm, train, minutes=args.minutes, lr=args.lr, heal_lr=heal_lr or args.heal_lr, batch_size=batch,
                             objective=Objective(**fields))
        dev_ppl, eval_ppl = perplexity(lm, dev, progress=False), perplexity(lm, split.eval, progress=False)
        if heal:
            healing.detach(lm.model)
        rows.append((name, state.step, dev_ppl, eval_ppl, sum(p.numel() for p in lm.parameters() if p.requires_grad)))
        print(f"{name}: {state.step} steps, dev {dev_ppl:.2f} ({dev_ppl / base_dev:.3f}x), eval {eval_ppl:.2f} "
              f"({eval_ppl / base_eval:.3f}x)", flush=True)
    best = min(rows[1:], key=lambda r: r[2])
    print(f"\n{'=' * 90}\n{args.base}, {len(layers)}/{report.num_layers} layers shared ({args.fraction:.0%}), "
          f"{args.minutes:g} CPU-min each, lr {args.lr}, heal rank {args.heal_rank} lr {','.join(f'{x:g}' for x in heal_lrs)}; "
          f"{time.perf_counter() - t0:.0f}s total")
    print("| objective | steps | dev ppl / base | eval ppl / base |\n|---|---|---|---|")
    print(f"| base | | {base_dev:.2f} | {base_eval:.2f} |")
    for name, steps, d, e, _ in rows:
        mark = "**" if name == best[0] else ""
        print(f"| {mark}{name}{mark} | {steps} | {d:.2f} ({d / base_dev:.3f}x) | {e:.2f} ({e / base_eval:.3f}x) |")
    print(f"best on dev: {best[0]}")


if __name__ == "__main__":
    main()
