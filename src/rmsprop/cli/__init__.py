"""The ``rmsprop`` command: ``compare``, ``tune`` and ``bench`` subcommands.

Each tool is a module with ``register(subparsers)`` (adds its parser, sets ``func``) and a
``run(args) -> int``. Errors a user can fix are :class:`CLIError`: printed as one line, exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

from .. import __version__

__all__ = ["main", "CLIError"]

TOOLS = ("compare", "tune", "bench")


class CLIError(Exception):
    """A user-facing error: printed as ``rmsprop: error: <message>`` without a traceback."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage dump
        tool = self.prog.removeprefix("rmsprop").strip()  # "compare" for a subcommand
        raise CLIError(f"{tool}: {message}" if tool else message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rmsprop", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"rmsprop {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(TOOLS) + "}",
                                parser_class=_Parser)
    sub.required = True
    for name in TOOLS:
        importlib.import_module(f"rmsprop.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except CLIError as e:
        print(f"rmsprop: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rmsprop: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
