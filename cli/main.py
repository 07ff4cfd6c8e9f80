"""`dba` console script: a thin dispatcher to one module per subcommand.

Each command module exposes `add_arguments(parser)` and `run(args) -> int | None`. Modules are
imported only when their command runs, so `dba kv-mem` never pays for importing JAX or torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dba.config import ConfigError
from dba.errors import UserError

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("cli.train", "train a model with JAX (v29 flag names)"),
    "sample": ("cli.sample", "generate text from a checkpoint (torch or JAX backend)"),
    "eval": ("cli.eval", "what a KV-cache policy costs: ppl, KL, top-1 vs fp32, passkey, extrapolation"),
    "kv-mem": ("cli.kvmem", "KV-cache memory table for a model and cache policy"),
    "convert": ("cli.convert", "convert weights between v29 .pt and safetensors exports"),
    "upcycle": ("cli.upcycle", "turn a pretrained standard/GQA model's attention into decoupled attention"),
    "prepare": ("cli.prepare", "text (txt, JSONL, Parquet, Arrow, a saved dataset) -> a token file for dba train"),
    "report": ("cli.report", "compare runs: best loss, KV cache, tokens/s; mean ± std over seeds"),
    "bench": ("cli.bench", "benchmarks: train-step and decode throughput"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other user mistake
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dba", description="Decoupled bottleneck attention: train, sample, measure.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    top = build_parser()
    if not argv or argv[0] not in COMMANDS:
        if argv and not argv[0].startswith("-"):
            top.error(f"unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}")
        top.parse_args(argv)
        top.print_help()
        return 0 if not argv else 2
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    parser = _Parser(prog=f"dba {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    args.debug = debug
    try:
        return int(module.run(args) or 0)
    except (UserError, ConfigError) as e:
        if debug:
            raise
        code = getattr(e, "code", 2)
        print(f"dba {name}: error: {e}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print(f"dba {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
