"""`lisa-hub` command line. Each feature module adds its own sub-commands through
`add_commands(subparsers)`; handlers import heavy libraries only when they run.

  lisa-hub up | down | status        local Ray head + MLflow server   (adapters_hub.stack)
  lisa-hub models                    base model names                 (below)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lisa-hub", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list base model names")
    p.set_defaults(func=_models)

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
