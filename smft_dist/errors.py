"""Errors a user can fix from the command line, and how every console script reports them.

Each part raises its own subclass of `UserError` (ConfigError, DataError, CheckpointError, ...)
with a message that names the problem and the fix. A console script's `main` is wrapped in
`@console_script`: such an error (or a missing/existing path) becomes one `error: ...` line on
stderr and exit status 2, never a traceback; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """Base of every error whose message tells the user what to change."""


USER_ERRORS = (UserError, FileNotFoundError, FileExistsError)

# What third-party readers (json, transformers, tokenizers) raise on a damaged or foreign file;
# a reader catches these around the call that parses the user's file and raises its UserError.
# UnicodeDecodeError and json.JSONDecodeError are ValueErrors.
READ_ERRORS = (OSError, ValueError, KeyError, TypeError, IndexError, RuntimeError)


def reason(e: BaseException) -> str:
    """`Type: first line of the message`: a third-party error's cause inside a one-line error."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}".rstrip(": ")


def console_script(main):
    """`main(argv) -> exit code`, with user errors printed as one `error:` line and exit 2."""

    @functools.wraps(main)
    def run(argv=None) -> int:
        try:
            return main(argv)
        except USER_ERRORS as e:  # one line, whatever the message quotes (a YAML parser's, say)
            print("error: " + " ".join(str(e).split()), file=sys.stderr)
            return 2

    return run
