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


def excerpt(value: object, limit: int = 40) -> str:
    """A short, printable, quoted excerpt of a value read from a file or a param, for error messages.

    Control characters and non-ASCII are escaped, and anything past ``limit``
    characters is cut, so an error can never pour a file (or a terminal escape
    sequence) onto the screen: ``'id;label\\x1b[2J…'``.
    """
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    text = str(value)
    cut = len(text) > limit
    text = text[:limit].encode("ascii", "backslashreplace").decode("ascii")
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return "'" + text.replace("'", "\\'") + ("…'" if cut else "'")
