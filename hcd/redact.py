"""Keep credentials out of everything hcd prints while a third-party client runs.

The official ``kaggle`` client prints request headers — ``Authorization: Basic
<base64 of user:key>`` or ``Bearer <token>`` — when ``VERBOSE=1`` (or
``VERBOSE_OUTPUT``) is set, and its debug logging can do the same. hcd cannot
rely on every such switch being off, so while the client runs,
:func:`redacted_output` routes the process's file descriptors 1 and 2 — Python
prints, logging handlers made earlier, C code alike — through a pipe, and a
reader thread passes every line on to the real stderr with the secrets replaced
by ``***``: each known secret (and its base64 forms, as in HTTP Basic auth) and
any ``Authorization:`` header value, whatever it holds. Progress bars keep
working: ``\\r``-terminated updates pass through as they come.
"""

from __future__ import annotations

import base64
import codecs
import contextlib
import json
import os
import re
import sys
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

MASK = "***"
_AUTH = re.compile(r"(?i)((?:proxy-)?authorization['\"]?\s*[:=]\s*['\"]?)(?:(?:basic|bearer|token)\s+)?[^\s'\",}]+")
_MIN_SECRET = 4  # shorter strings would blank ordinary text


class Redactor:
    """Replace secrets (and their base64 forms) and Authorization header values in text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        forms: set[str] = set()
        for s in secrets:
            if s and len(s) >= _MIN_SECRET:
                forms.add(s)
                forms.add(base64.b64encode(s.encode()).decode())
        self.secrets = sorted(forms, key=len, reverse=True)  # longest first: a secret inside another
        self.longest = max((len(s) for s in self.secrets), default=0)

    def __call__(self, text: str) -> str:
        for s in self.secrets:
            text = text.replace(s, MASK)
        return _AUTH.sub(lambda m: m.group(1) + MASK, text)


def kaggle_secrets(env: dict[str, str] | None = None) -> list[str]:
    """Every Kaggle credential this process could use: environment, ``kaggle.json``, token files."""
    env = dict(os.environ if env is None else env)
    found: list[str] = []
    user = env.get("KAGGLE_USERNAME", "")
    for name in ("KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_IAP_TOKEN"):
        if env.get(name):
            found.append(env[name])
    cfg = Path(env.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))
    files = [cfg / "access_token", cfg / "access_token.txt", Path.home() / ".kaggle" / "access_token", Path.home() / ".kaggle" / "access_token.txt"]
    for name in ("KAGGLE_API_TOKEN", "KAGGLE_API_V1_TOKEN"):
        if env.get(name) and len(env[name]) < 4096:
            files.append(Path(env[name]))
    for f in files:
        with contextlib.suppress(OSError, ValueError):
            if f.is_file() and f.stat().st_size < 65536:
                found.append(f.read_text().strip())
    with contextlib.suppress(OSError, ValueError, AttributeError):
        conf = json.loads((cfg / "kaggle.json").read_text())
        found.append(str(conf.get("key") or ""))
        user = user or str(conf.get("username") or "")
    keys = [s for s in found if s]
    return keys + [f"{user}:{k}" for k in keys if user]  # HTTP Basic auth sends base64("user:key")


@contextlib.contextmanager
def redacted_output(redact: Redactor) -> Iterator[None]:
    """Route fds 1 and 2 through ``redact`` to the real stderr while the block runs."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 1)
    os.dup2(write_end, 2)
    os.close(write_end)
    reader = threading.Thread(target=_pump, args=(read_end, saved_err, redact), daemon=True)
    reader.start()
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os.dup2(saved_out, 1)  # closes the pipe's last write ends: the reader sees EOF
        os.dup2(saved_err, 2)
        reader.join(timeout=10)
        os.close(saved_out)
        os.close(saved_err)


def _pump(read_end: int, out_fd: int, redact: Redactor) -> None:
    """Copy the pipe to ``out_fd`` line by line (``\\n`` or ``\\r``), redacted."""
    pending = ""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while True:
            chunk = pipe.read(65536)
            text = decoder.decode(chunk or b"", final=not chunk)
            pending += text
            cut = max(pending.rfind("\n"), pending.rfind("\r"))
            if not chunk:
                cut = len(pending) - 1
            elif cut < 0 and len(pending) > 65536:  # a very long line: pass it on, keeping a tail a secret could straddle
                cut = len(pending) - redact.longest - 64 - 1
            if cut >= 0:
                _write_all(out_fd, redact(pending[: cut + 1]).encode())
                pending = pending[cut + 1 :]
            if not chunk:
                return


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
