"""Errors that reach the user as one clear line and a documented exit code.

Exit codes: 0 ok, 1 internal error, 2 bad input (a file or a value the user gave),
3 engine or environment mismatch (engines built for something else, backend missing).
"""

from __future__ import annotations


class WanTrtError(Exception):
    """Base class: its message is printed as one line; ``exit_code`` is the process exit status."""

    exit_code = 1


class BadInputError(WanTrtError):
    """A user-supplied file or value is unusable. The message names it and says how to fix it."""

    exit_code = 2


class EngineError(WanTrtError):
    """The engines directory, its manifest or the runtime backend do not fit this request."""

    exit_code = 3
