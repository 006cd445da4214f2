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


def console_script(main):
    """`main(argv) -> exit code`, with user errors printed as one `error:` line and exit 2."""

    @functools.wraps(main)
    def run(argv=None) -> int:
        try:
            return main(argv)
        except USER_ERRORS as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return run
