"""`alibi-lm`: the command line. The only module that prints errors and chooses exit codes.

Each subcommand is a module in `alibi_lm.commands` that defines NAME, HELP, ORDER (its place in
`--help`), `add_arguments(parser)` and `run(args) -> int`; they are found at start-up, and import
their heavy dependencies inside `run`, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from types import ModuleType

from alibi_lm import __version__, commands
from alibi_lm.errors import UserError

__all__ = ["build_parser", "main"]

DESCRIPTION = """\
ALiBi language models: train short, test long.

Typical session:
  alibi-lm demo                                   train ALiBi and sinusoidal, show extrapolation
  alibi-lm prepare wikitext-2 -o data/wt2 --tokenizer word
  alibi-lm train --config configs/small.toml --set data.path=data/wt2
  alibi-lm evaluate runs/small --lengths 512,1024,2048 -o runs/small/eval.json
  alibi-lm plot runs/small/eval.json -o ppl.png
  alibi-lm generate runs/small --prompt "The history of"
"""


def _command_modules() -> list[ModuleType]:
    modules = [importlib.import_module(f"{commands.__name__}.{info.name}")
               for info in pkgutil.iter_modules(commands.__path__) if not info.name.startswith("_")]
    return sorted(modules, key=lambda m: (getattr(m, "ORDER", 100), m.NAME))


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake told in one line (like every other user error) instead of the
    usage block: the line names the command and where its help is."""

    #: the subcommands' parsers by name (build_parser fills it), so that an unknown option after a
    #: command points at that command's help rather than at the top-level one
    command_parsers: dict[str, argparse.ArgumentParser]

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> _Parser:
    parser = _Parser(prog="alibi-lm", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"alibi-lm {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.command_parsers = {}
    for module in _command_modules():
        description = getattr(module, "DESCRIPTION", module.HELP)
        sub = subparsers.add_parser(module.NAME, help=module.HELP, description=description,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
        parser.command_parsers[module.NAME] = sub
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.command_parsers.get(args.command, parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.run(args) or 0)
    except UserError as error:
        print(f"alibi-lm {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:  # an Interrupted says where the work can go on from
        print(f"alibi-lm {args.command}: {str(interrupt) or 'interrupted'}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout was closed early (`alibi-lm generate ... | head`): stop quietly, as `cat` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as error:
        # an unwritable or missing path, a full disk: the user can fix it, no traceback helps
        where = f": {error.filename}" if error.filename is not None else ""
        print(f"alibi-lm {args.command}: error: {error.strerror or error}{where}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as error:
        if not _out_of_memory(error):
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"alibi-lm {args.command}: error: out of memory ({first[:160]}); ask for less: shorter lengths, "
              "fewer tokens per batch, fewer new tokens or a smaller model", file=sys.stderr)
        return 2


def _out_of_memory(error: BaseException) -> bool:
    """numpy's and Python's MemoryError, torch's CUDA OutOfMemoryError, the CPU allocator's RuntimeError."""
    return (isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in str(error))


if __name__ == "__main__":
    sys.exit(main())
