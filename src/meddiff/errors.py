"""The one error type a user can act on.

A :class:`UserError` says what is wrong with the user's input or set-up (a params key, a missing
de-identification key, a folder an earlier stage should have written) and what to do about it. The
CLI prints its message on one line and exits with status 2, without a traceback; every other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or set-up; the message names the file, key or variable and the fix."""
