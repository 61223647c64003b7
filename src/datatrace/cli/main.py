"""The ``datatrace`` command line.

Every subcommand lives in its own module and plugs in through :data:`COMMANDS`: a name mapped to a
:class:`Command` holding a one-line help, ``add_arguments(parser)`` and ``run(args) -> exit code``. Adding
``datatrace explain`` is one module with those two functions and one :func:`register` call (or one line in
:func:`_builtin_commands`).

Exit codes: 0 success; 1 an error while running (the message says what and how to fix it; ``--traceback``
shows the stack); 2 bad command-line usage (argparse's own messages, or a bad ``--out``); 130 interrupted.

Logging: datatrace's INFO messages go to stderr as ``datatrace: message``; warnings of every library stay
visible; ``--quiet`` turns off progress bars and the INFO lines (warnings and the summary remain).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

from datatrace import __version__
from datatrace.cli import audit, debug, demo, explain, value
from datatrace.errors import UsageError

__all__ = ["COMMANDS", "Command", "build_parser", "main", "register"]

PROG = "datatrace"


class Command(NamedTuple):
    """A subcommand: ``help`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str = ""


#: subcommand name -> Command; later applications (explain, debug, value, audit) register here
COMMANDS: dict[str, Command] = {}


def register(name: str, command: Command) -> None:
    """Make ``datatrace <name>`` run ``command``."""
    COMMANDS[name] = command


def _builtin_commands() -> None:
    for name, module in (
        ("demo", demo),
        ("explain", explain),
        ("debug", debug),
        ("value", value),
        ("audit", audit),
    ):
        register(name, Command(module.HELP, module.add_arguments, module.run, module.DESCRIPTION))


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and record.levelno >= logging.ERROR:
            message += "\n" + self.formatException(record.exc_info)
        if record.levelno >= logging.WARNING:
            return f"{PROG}: {record.levelname.lower()} ({record.name}): {message}"
        return f"{PROG}: {message}"


class _LoggingSetup:
    """Install a stderr handler for the run of :func:`main` and undo it afterwards (main can be called twice)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def __enter__(self) -> _LoggingSetup:
        root, package = logging.getLogger(), logging.getLogger("datatrace")
        self.saved = (root.level, package.level, package.propagate)
        self.handler = logging.StreamHandler(sys.stderr)
        self.handler.setFormatter(_Formatter())
        root.addHandler(self.handler)
        root.setLevel(logging.WARNING)
        package.setLevel(logging.WARNING if self.quiet else logging.INFO)
        package.propagate = True
        logging.captureWarnings(True)
        return self

    def __exit__(self, *exc: object) -> None:
        root, package = logging.getLogger(), logging.getLogger("datatrace")
        logging.captureWarnings(False)
        root.removeHandler(self.handler)
        root.setLevel(self.saved[0])
        package.setLevel(self.saved[1])
        package.propagate = self.saved[2]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    if not COMMANDS:
        _builtin_commands()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "datatrace: which training examples made the model do that, and by how much? Scores estimate "
            "f(theta without i) - f(theta): the change of a query's measurement (by default its loss, in the "
            "loss's units) if training example i were removed and the model retrained. Positive on a loss: i "
            "helped the query (proponent); negative: i hurt it (opponent)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--quiet", action="store_true", help="no progress bars and no step-by-step log lines."
    )
    common.add_argument(
        "--traceback", action="store_true", help="on an error, show the full Python traceback."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(
            name,
            parents=[common],
            help=command.help,
            description=command.description or command.help,
        )
        command.add_arguments(sub)
        sub.set_defaults(_run=command.run, _name=name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``datatrace`` command line; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and argparse's own usage errors
        return int(exc.code or 0) if isinstance(exc.code, int) or exc.code is None else 2
    if getattr(args, "_run", None) is None:
        parser.print_help(sys.stderr)
        return 2
    name = args._name
    with _LoggingSetup(args.quiet):
        log = logging.getLogger("datatrace.cli.main")
        try:
            return int(args._run(args) or 0)
        except UsageError as err:
            print(f"{PROG} {name}: error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"{PROG} {name}: interrupted.", file=sys.stderr)
            return 130
        except Exception as err:
            if args.traceback:
                log.exception("%s failed", name)
            else:
                print(
                    f"{PROG} {name}: error: {type(err).__name__}: {err}\n(run again with --traceback for details)",
                    file=sys.stderr,
                )
            return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
