"""What both CLIs share: quiet library logging, --debug, and turning errors into messages and exit codes.

Exit codes: 0 done; 1 an unexpected error (a bug: one line saying so and where the traceback is);
2 a usage error or one of the project's own errors (one line naming the file, key or value);
130 interrupted (Ctrl-C or SIGTERM). A closed stdout (`embedcache info STORE | head`) ends quietly.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys
import tempfile
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable

EXIT_UNEXPECTED = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a reader that went away


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" on every flag, except where the help already says its default or
    there is none worth saying: None, and the default of an on/off switch (`--no-tokens` shows
    "(default: True)" otherwise, which reads as if the switch were on)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if "default:" in (action.help or "") or action.default is None or switch:
            return action.help or ""
        return super()._get_help_string(action)


def quiet_libraries() -> None:
    """Keep transformers' load-time chatter out of the terminal; real errors still raise."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def add_debug_flag(parser: argparse.ArgumentParser, *, top: bool = True) -> None:
    """`--debug` on the program and on every (nested) subcommand, so it may be given anywhere."""
    # SUPPRESS below the top: a subcommand not given --debug must not reset the program's flag.
    parser.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="on an unexpected error, print the full traceback instead of writing it to a file")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                add_debug_flag(sub, top=False)


def write_traceback(prog: str, error: BaseException) -> str:
    """The full traceback in a new file in the system's temp directory; returns its path."""
    fd, path = tempfile.mkstemp(prefix=f"{prog.split()[-1]}-error-", suffix=".txt")  # "python -m cli.demo" -> cli.demo-error-*
    with os.fdopen(fd, "w") as f:
        f.write(f"{prog} {' '.join(sys.argv[1:])}\n\n")
        traceback.print_exception(error, file=f)
    return path


def _quiet_broken_pipe() -> None:
    """The reader of stdout went away: send what is still buffered nowhere, so exit prints no second error."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (e.g. captured in tests)
        pass


def run_main(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    *,
    interrupted: str,
    load_config: Callable[[argparse.ArgumentParser, list[str] | None], list[str] | None] | None = None,
) -> int:
    """Parse, run the command's function, and map what it raises to one line and an exit code.

    Only the project's own errors (EmbedcacheError, which fusion's FusionError derives from) are
    shown as messages: they are raised on purpose and name the file, key or value. Anything else
    is a bug and is reported as one (traceback in a file, or on stderr with --debug). `interrupted`
    is what Ctrl-C (and SIGTERM) prints: the truth about what was kept and how to go on.
    """
    quiet_libraries()
    # A fatal signal prints every thread's Python stack instead of only "Bus error": a local store's
    # files are memory-mapped for reading (embedcache.mapped_store), where a disk error is a SIGBUS.
    if not faulthandler.is_enabled():
        try:
            faulthandler.enable()
        except (OSError, ValueError, AttributeError):  # stderr is not a file (captured by a caller): nowhere to print
            pass
    # Line by line even into a pipe or a log file: a build waiting for another, or a long run's
    # progress lines, show up when they happen, not when a buffer fills.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    with _sigterm_as_ctrl_c():
        return _run(parser, argv, interrupted, load_config, debug)


@contextmanager
def _sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM (a scheduler's kill, `timeout`) stops the command as Ctrl-C does, keeping what it finished."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: signals are not ours to take
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(parser, argv, interrupted: str, load_config, debug: bool) -> int:
    from embedcache.errors import EmbedcacheError
    from fusion.errors import FusionError

    try:
        if load_config is not None:
            argv = load_config(parser, argv)
        args = parser.parse_args(argv)
        debug = getattr(args, "debug", debug)
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers below, not at interpreter exit
        return code
    except (EmbedcacheError, FusionError) as e:
        if debug:
            traceback.print_exc()
        # One line, whatever a library's text quoted inside it spans (transformers' offline message: three).
        print(f"{parser.prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt as e:  # a build's own (embedcache.errors.Interrupted) says what it kept
        print(f"{parser.prog}: interrupted; {str(e) or interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _quiet_broken_pipe()
        return EXIT_BROKEN_PIPE
    except Exception as e:  # noqa: BLE001 -- the one place a bug is turned into a report instead of a traceback
        if debug:
            traceback.print_exc()
            print(f"{parser.prog}: unexpected error (a bug): {type(e).__name__}: {e}", file=sys.stderr)
            return EXIT_UNEXPECTED
        path = write_traceback(parser.prog, e)
        first = str(e).splitlines()[0] if str(e) else ""
        print(
            f"{parser.prog}: unexpected error (a bug, please report it): {type(e).__name__}: {first[:200]}; "
            f"full traceback in {path} (rerun with --debug to print it)",
            file=sys.stderr,
        )
        return EXIT_UNEXPECTED
