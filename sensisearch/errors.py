"""User-facing errors.

Every error a user can cause (a bad flag, a missing file, data that does not fit
the model) is raised as :class:`SensisearchError` with a one-line message that
names the file or flag and says what to do. The CLI prints it and exits non-zero;
anything else escaping is a bug.
"""

from __future__ import annotations


class SensisearchError(Exception):
    """An error caused by the user's input, with a one-line, actionable message."""

    def __init__(self, message: str) -> None:
        # Keep it on one line: the CLI prints it as-is and scripts grep it.
        super().__init__(" ".join(str(message).split()))
