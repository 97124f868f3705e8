"""What both CLIs share: quiet library logging, and turning library errors into messages and exit codes."""

from __future__ import annotations

import argparse
import os
import sys


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" on every flag, except where the help already says its default or
    there is none to say (None, or False for on/off switches)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if "default:" in (action.help or "") or action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def quiet_libraries() -> None:
    """Keep transformers' load-time chatter out of the terminal; real errors still raise."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_main(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse, run the command's function, and map errors: ours -> exit 2 with one line, Ctrl-C -> 130."""
    from embedcache.errors import EmbedcacheError

    quiet_libraries()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except EmbedcacheError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, KeyError) as e:  # the fusion side raises ValueError subclasses with full messages
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; run the same command again to finish (work done so far is kept)", file=sys.stderr)
        return 130
