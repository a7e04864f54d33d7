"""One exception type for every problem a user can fix.

Stages raise :class:`HcdError` with a message that names the file or params key
and the problem; :func:`hcd.cli.run_stage` prints it as one line and exits 2
instead of showing a traceback.
"""

from __future__ import annotations


class HcdError(Exception):
    """A user-facing error: one line naming the file or key and what is wrong."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))  # always one line
