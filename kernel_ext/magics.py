"""``%duet``: start, inspect, decide and close a duet from notebook cells.

    %duet launch [--server URL] [--name NAME]        owner: open a duet, show the join line
    %duet join CODE [--server URL] [--name NAME]     researcher: join with the owner's code
    %duet status | requests | close [--name NAME]
    %duet stop [--name NAME]                         owner: stop the researcher's running work
    %duet approve ID | deny ID [REASON ...]          owner: decide a request (ID or a prefix)

The session is bound to ``session`` in the notebook by default, not ``duet``: after
``import duet`` that name is the module, and the join line the owner hands over
(``duet.join(...)``) must keep working in the same notebook. Commands that act on a session
use ``--name``, else the session the last ``%duet launch``/``join`` created, else the only
duet session in the namespace. Sessions made with ``duet.launch()`` in code work too.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.display import display

from duet import OwnerSession, ResearcherSession
from duet.api import join, launch
from duet.approvals import Request
from duet.errors import DuetError
from duet.screen import safe_text
from duet.session import Session

from .display import session_state
from .widgets import approval_panel

__all__ = ["DEFAULT_NAME", "DuetMagics"]

DEFAULT_NAME = "session"


class _HelpShown(Exception):
    """``-h`` printed the help; the magic has nothing more to do."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports to IPython instead of exiting the kernel."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}\n{self.format_usage()}")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            print(message, file=sys.stderr)
        raise _HelpShown


def _add_ice(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--ice-server", action="append", metavar="URL",
                       help="STUN/TURN server (repeatable); default: a public STUN server")
    group.add_argument("--no-stun", action="store_true",
                       help="no STUN/TURN server at all (both peers on this machine or LAN)")


def _build_parser() -> _Parser:
    parser = _Parser(prog="%duet", description="Private data science between two notebooks.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    start = commands.add_parser("launch", help="open a duet as the data owner")
    start.add_argument("--server", help="signaling server URL (default: $DUET_SIGNALING_URL, "
                                        "else one embedded in this kernel)")
    start.add_argument("--audit-path", help="the audit log file (default: $DUET_AUDIT_PATH, "
                                            "else the user's data directory)")
    start.add_argument("--name", default=DEFAULT_NAME, help="variable to bind the session to")
    _add_ice(start)

    enter = commands.add_parser("join", help="join the owner's duet as the researcher")
    enter.add_argument("code", help="the join code from the owner's join line")
    enter.add_argument("--server", help="the server URL from the owner's join line")
    enter.add_argument("--name", default=DEFAULT_NAME, help="variable to bind the session to")
    enter.add_argument("--timeout", type=float, help="seconds to wait for the connection")
    _add_ice(enter)

    for command, text in (("status", "where the session stands"),
                          ("requests", "the owner's approval panel"),
                          ("stop", "owner: stop the researcher's running operations now"),
                          ("close", "leave the duet")):
        commands.add_parser(command, help=text).add_argument("--name")
    approve = commands.add_parser("approve", help="send a requested value to the researcher")
    approve.add_argument("id", help="request id, or a unique prefix of it")
    approve.add_argument("--name")
    deny = commands.add_parser("deny", help="refuse a request, with a reason")
    deny.add_argument("id", help="request id, or a unique prefix of it")
    deny.add_argument("reason", nargs="*", help="told to the researcher")
    deny.add_argument("--name")
    return parser


def _ice_servers(args: argparse.Namespace) -> list[str] | None:
    return [] if args.no_stun else args.ice_server


@magics_class
class DuetMagics(Magics):
    """The ``%duet`` line magic; holds which session the short forms act on."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self._parser = _build_parser()
        self._last_name: str | None = None

    @line_magic
    def duet(self, line: str) -> None:
        """Start, inspect, decide and close a duet; ``%duet -h`` lists the commands."""
        try:
            args = self._parser.parse_args(shlex.split(line))
        except _HelpShown:
            return
        try:
            getattr(self, f"_cmd_{args.command}")(args)
        except DuetError as exc:
            raise UsageError(f"duet: {exc}") from exc

    # -- starting -------------------------------------------------------------------------
    def _cmd_launch(self, args: argparse.Namespace) -> None:
        self._release(args.name)
        session = launch(args.server, ice_servers=_ice_servers(args),
                         audit_path=args.audit_path, show=False)
        self._bind(args.name, session)
        print(f"duet: launched; the researcher joins with this line (send it to them):\n"
              f"  {session.join_line}\n"
              f"or, in a notebook with %load_ext kernel_ext:\n"
              f"  %duet join {session.code} --server {session.server_url}\n"
              f"The session is `{args.name}`: {args.name}.share(obj, name=...) to share; "
              f"decide requests below or with %duet approve ID / %duet deny ID REASON.")
        display(approval_panel(session.requests))

    def _cmd_join(self, args: argparse.Namespace) -> None:
        self._release(args.name)
        session = join(args.code, args.server, ice_servers=_ice_servers(args),
                       timeout=args.timeout)
        self._bind(args.name, session)
        print(f"duet: connected to the owner; the session is `{args.name}`, "
              f"its store `{args.name}.store`.")
        display(session.store)

    @property
    def _ns(self) -> dict[str, Any]:
        assert self.shell is not None, "the magic is registered with a shell"
        return self.shell.user_ns  # type: ignore[no-any-return]

    def _release(self, name: str) -> None:
        """Re-running a launch/join cell replaces its session; never clobber other data."""
        current = self._ns.get(name)
        if isinstance(current, Session):
            current.close()
        elif current is not None:
            raise UsageError(f"`{name}` already holds a {type(current).__name__}; "
                             "pick another variable with --name")

    def _bind(self, name: str, session: Session) -> None:
        self._ns[name] = session
        self._last_name = name

    # -- acting on a session --------------------------------------------------------------
    def _session(self, name: str | None) -> Session:
        ns = self._ns
        if name is None and self._last_name is not None and \
                isinstance(ns.get(self._last_name), Session):
            name = self._last_name
        if name is not None:
            found = ns.get(name)
            if not isinstance(found, Session):
                raise UsageError(f"`{name}` is not a duet session")
            return found
        sessions = {k: v for k, v in ns.items() if isinstance(v, Session) and not k.startswith("_")}
        if len(sessions) != 1:
            which = ", ".join(sorted(sessions)) or "none"
            raise UsageError(f"which duet session? pass --name (sessions here: {which})")
        return next(iter(sessions.values()))

    def _owner(self, name: str | None) -> OwnerSession:
        session = self._session(name)
        if not isinstance(session, OwnerSession):
            raise UsageError("only the data owner has requests to decide")
        return session

    def _cmd_status(self, args: argparse.Namespace) -> None:
        session = self._session(args.name)
        state = session_state(session)
        if isinstance(session, OwnerSession):
            requests = session.requests
            print(f"duet owner session: {state}\n"
                  f"  join line: {session.join_line}\n"
                  f"  shared: {', '.join(session.shared) or 'nothing yet'}\n"
                  f"  requests: {len(requests)} ({len(requests.pending)} pending)\n"
                  f"  worker process: {session.worker_pid or 'stopped'}\n"
                  f"  audit log: {session.audit.path}")
            for budget in session.budgets.values():
                print(f"  privacy {budget}")
        else:
            assert isinstance(session, ResearcherSession)
            line = f"duet researcher session: {state}"
            if session.connected:
                line += f" (round trip {session.ping() * 1000:.1f} ms)"
            print(f"{line}\n  store: {', '.join(session.store) or 'nothing shared yet'}")

    def _cmd_requests(self, args: argparse.Namespace) -> None:
        display(approval_panel(self._owner(args.name).requests))

    def _cmd_approve(self, args: argparse.Namespace) -> None:
        request = _find(self._owner(args.name).requests, args.id)
        request.approve()
        print(f"approved {request.id} (checks: {request.check_status.upper()}): "
              f"{safe_text(request.lineage)}")

    def _cmd_deny(self, args: argparse.Namespace) -> None:
        request = _find(self._owner(args.name).requests, args.id)
        request.deny(" ".join(args.reason))
        print(f"denied {request.id}: {safe_text(request.lineage)}")

    def _cmd_stop(self, args: argparse.Namespace) -> None:
        owner = self._owner(args.name)
        owner.cancel()
        print("duet: the researcher's operations were stopped (the worker restarted; the "
              "researcher's objects are gone and pending requests withdrawn)")

    def _cmd_close(self, args: argparse.Namespace) -> None:
        session = self._session(args.name)
        session.close()
        print("duet: session closed")


def _find(requests: Sequence[Request], prefix: str) -> Request:
    """A request by id or unique prefix: ids are long to type."""
    matches = [r for r in requests if r.id.startswith(prefix)]
    if len(matches) != 1:
        problem = "no request" if not matches else f"{len(matches)} requests"
        raise UsageError(f"{problem} with an id starting {prefix!r}")
    return matches[0]
