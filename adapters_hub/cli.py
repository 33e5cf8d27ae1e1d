"""`lisa-hub` command line. Each feature module adds its own sub-commands through
`add_commands(subparsers)`; handlers import heavy libraries only when they run.

  lisa-hub up | down | status        local Ray head + MLflow server   (adapters_hub.stack)
  lisa-hub models                    base model names                 (below)
  lisa-hub eval-ppl --base NAME      WikiText-2 perplexity            (below)
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute sub-commands; each defines add_commands(subparsers).
COMMAND_MODULES = [
    "adapters_hub.stack",
    "adapters_hub.lisa.cli",
    "adapters_hub.drop.cli",
    "adapters_hub.tasks.cli",
    "sdk.cli",
]


def _models(args: argparse.Namespace) -> int:
    from adapters_hub.models import list_models

    for info in list_models():
        print(f"{info.name:14s} {info.description}  [{info.source}]")
    print("(or any Hugging Face model id / local model folder)")
    return 0


def _eval_ppl(args: argparse.Namespace) -> int:
    import time

    from adapters_hub.data import load_text, token_blocks
    from adapters_hub.evaluation import perplexity
    from adapters_hub.models import load_base

    start = time.perf_counter()
    model, tok = load_base(args.base, dtype=args.dtype)
    blocks = token_blocks(tok, load_text(args.data), n_blocks=args.blocks, block_len=args.block_len)
    ppl = perplexity(model, blocks)
    print(f"{args.base} {args.data} perplexity over {args.blocks} x {args.block_len} tokens: {ppl:.3f} "
          f"({time.perf_counter() - start:.1f}s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lisa-hub", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list base model names")
    p.set_defaults(func=_models)

    p = sub.add_parser("eval-ppl", help="perplexity of a base model on a text corpus")
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--data", default="wikitext2")
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--block-len", type=int, default=1024)
    p.add_argument("--dtype", default="float32")
    p.set_defaults(func=_eval_ppl)

    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (LookupError, ValueError, RuntimeError, OSError) as err:
        # Known failure kinds get one clear line instead of a traceback.
        print(f"lisa-hub {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
