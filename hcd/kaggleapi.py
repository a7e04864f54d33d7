"""The official ``kaggle`` client, the way hcd uses it: credentials, authentication, and its
HTTP errors as one line that says how to fix them (the download stage and ``hcd submit``).

Callers run the client inside :func:`hcd.redact.redacted_output`, so nothing it prints —
its progress bars, and with ``VERBOSE=1`` or debug logging its request headers — shows a key.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

from hcd.errors import HcdError

TOKEN_URL = "https://www.kaggle.com/settings/api"
RULES_URL = "https://www.kaggle.com/competitions/{c}/rules"


def has_credentials() -> bool:
    cfg = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))
    env = os.environ
    return bool(env.get("KAGGLE_API_TOKEN") or (env.get("KAGGLE_USERNAME") and env.get("KAGGLE_KEY")) or (cfg / "kaggle.json").is_file() or (cfg / "access_token").is_file())


def require_credentials() -> None:
    if not has_credentials():
        raise HcdError(f"kaggle: no credentials — create a token at {TOKEN_URL} and save it as ~/.kaggle/kaggle.json (chmod 600) or set KAGGLE_API_TOKEN")


def authenticated_api():
    """A ``KaggleApi`` that has accepted the credentials; the client prints help and calls exit()
    when it does not, so it runs quietly and a refusal becomes one line."""
    quiet = io.StringIO()
    try:
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            from kaggle.api.kaggle_api_extended import KaggleApi

            api = KaggleApi()
            api.authenticate()
    except (SystemExit, Exception):
        raise HcdError(f"kaggle: the credentials in ~/.kaggle or the environment were not accepted — create a new token at {TOKEN_URL}") from None
    return api


def request_error(exc: BaseException, competition: str, what: str) -> HcdError:
    """A failed client call (``what``: "download of", "submission to") as one line naming the fix."""
    status = getattr(getattr(exc, "response", None), "status_code", None) or getattr(exc, "status", None)
    if status == 403:
        return HcdError(f"kaggle: {'access to' if what.startswith('download') else what} {competition!r} refused — accept the competition rules at {RULES_URL.format(c=competition)} with the account of your token")
    if status == 401:
        return HcdError(f"kaggle: the token was rejected (401) — create a new one at {TOKEN_URL}")
    if status == 404:
        return HcdError(f"kaggle: competition {competition!r} not found (check data.competition in params.yaml)")
    return HcdError(f"kaggle: {what} {competition!r} failed ({type(exc).__name__}{f', HTTP {status}' if status else ''}); check the network and retry")
