"""The ``duet`` console script (also ``python -m duet.cli``).

Subcommands:
    duet audit [PATH] [--json] [--session S] [--event E] [--limit N]
        print the owner's audit log as a table, or as JSON lines with --json.

Exit codes: 0 success, 2 bad usage or an unreadable/missing audit log.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .audit import EVENTS, AuditError, AuditLog, default_audit_path, format_table


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _audit(args: argparse.Namespace) -> int:
    path = args.path if args.path is not None else default_audit_path()
    try:
        # Read-only: inspecting the log must never change it, even while a session writes it.
        with AuditLog(path, readonly=True) as log:
            events = log.events(session=args.session, event=args.event, limit=args.limit)
    except FileNotFoundError:
        print(f"duet audit: no audit log at {path}", file=sys.stderr)
        return 2
    except AuditError as exc:
        print(f"duet audit: {exc}", file=sys.stderr)
        return 2
    if args.json:
        sys.stdout.writelines(e.to_json() + "\n" for e in events)
    elif events:
        print(format_table(events))
    else:
        print(f"no matching events in {path}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="duet", description="duet: data science on data you may not see."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    audit = commands.add_parser(
        "audit",
        help="print the owner's audit log",
        description="Print the owner's audit log as a table (or JSON lines with --json).",
    )
    audit.add_argument(
        "path",
        nargs="?",
        metavar="PATH",
        help=f"the audit log file (default: {default_audit_path()}; env DUET_AUDIT_PATH)",
    )
    audit.add_argument("--json", action="store_true", help="one JSON object per line")
    audit.add_argument("--session", metavar="S", help="only events of this session id")
    audit.add_argument("--event", metavar="E", choices=sorted(EVENTS), help="only this event")
    audit.add_argument(
        "--limit", metavar="N", type=_positive_int, help="only the last N matching events"
    )
    audit.set_defaults(run=_audit)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
