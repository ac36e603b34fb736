"""The ``unlearn`` command.

Subcommands available now: ``info``. (``demo``, ``run`` and ``apply`` arrive with the methods and
production issues; until then they are not listed.)
"""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unlearn", description="Fast machine unlearning for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="versions, build and the backends usable on each device")
    info.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "info":
        from unlearn_ext import info

        return info.main(["--json"] if args.json else [])
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse rejects unknown commands


if __name__ == "__main__":
    raise SystemExit(main())
