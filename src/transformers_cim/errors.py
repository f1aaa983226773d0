"""Errors in what the user asked for (a missing path, a bad flag value, an empty dataset, a checkpoint of the wrong
kind),
kept apart from internal errors.

Both scripts run their `main` through `exit_on_user_error`: a `UserError` is printed as one line, ``<script>: error:
<message>``, and the process exits with status 2 (as `argparse` does for a bad command line), with no traceback; any
other exception keeps its traceback. A `UserError` is also a `ValueError` (or a `FileNotFoundError` for a missing
path), so code that catches those keeps working.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

USER_ERROR_EXIT_STATUS = 2


class UserError(Exception):
    """An error the user can fix from the command line or the data: printed as one line, exit status 2."""


class UserValueError(UserError, ValueError):
    """A flag value, a dataset or a checkpoint that cannot be used as given."""


class UserPathError(UserError, FileNotFoundError):
    """A path (or Hub id) that does not exist."""


def exit_on_user_error(main: Callable[[], Any], prog: str | None = None) -> Any:
    """Runs ``main()``; a `UserError` ends the process with one line on stderr and exit status 2."""
    try:
        return main()
    except UserError as err:
        prog = prog or os.path.basename(sys.argv[0])
        message = " ".join(str(err).split())  # one line, whatever the message's own line breaks
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT_STATUS) from None


__all__ = ["USER_ERROR_EXIT_STATUS", "UserError", "UserPathError", "UserValueError", "exit_on_user_error"]
