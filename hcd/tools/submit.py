"""``hcd submit``: upload ``results/submission.csv`` to the competition with the official ``kaggle`` client.

The file is validated first exactly as the ``ensemble`` stage validates it (header
``id,label``, every ``sample_submission.csv`` id once, in its order, probabilities in
[0, 1]). The submission message carries the git revision and a digest of
``params.yaml``, so a score on Kaggle's leaderboard leads back to the run. Missing
credentials, a rejected token or rules not yet accepted give one line saying how
to fix it; the key is never printed (everything the client prints passes through
the same redaction as the download).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import sys
from pathlib import Path

from hcd.data.tables import read_csv_file
from hcd.digests import git_revision
from hcd.errors import HcdError
from hcd.kaggleapi import authenticated_api, request_error, require_credentials
from hcd.pipeline.params import load_params
from hcd.stages.ensemble import validate_submission


def message(params_file: Path, note: str | None = None) -> str:
    """``hcd <revision> params <digest>[: note]`` — what the leaderboard shows beside the score."""
    rev = (git_revision(params_file.parent) or "no-git")[:12]
    digest = hashlib.sha256(params_file.read_bytes()).hexdigest()[:12]
    return f"hcd {rev} params {digest}" + (f": {note}" if note else "")


def check_submission(path: Path, test_index: Path) -> int:
    if not path.exists():
        raise HcdError(f"{path}: not found (run the pipeline first: dvc repro or snakemake --cores all)")
    if not test_index.exists():
        raise HcdError(f"{test_index}: not found (the scan stage writes it; it lists sample_submission.csv's ids)")
    sub = read_csv_file(path)
    expected = read_csv_file(test_index)["id"].tolist()
    validate_submission(sub, expected, str(path))
    return len(sub)


def submit(path: Path, competition: str, text: str, log=print) -> str:
    """Upload with the official client; its response message."""
    require_credentials()
    from hcd.redact import Redactor, kaggle_secrets, redacted_output

    with redacted_output(Redactor(kaggle_secrets())):
        return _upload(path, competition, text)


def _upload(path: Path, competition: str, text: str) -> str:
    api = authenticated_api()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            response = api.competition_submit(str(path), text, competition, quiet=True)
    except (SystemExit, Exception) as exc:
        raise request_error(exc, competition, "submission to") from None
    said = str(getattr(response, "message", "") or "")
    if said == getattr(api, "COMPETITION_SUBMIT_UPLOAD_FAILED_MESSAGE", None):
        raise HcdError(f"kaggle: the upload of {path} did not complete; retry")
    return said


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="hcd submit", description=__doc__.splitlines()[0].split(": ", 1)[1])
    ap.add_argument("--file", default="results/submission.csv", help="the submission (default: results/submission.csv)")
    ap.add_argument("--test-index", default="data/packed/test_index.csv", help="sample_submission's ids, in order (default: data/packed/test_index.csv)")
    ap.add_argument("--params", default="params.yaml", help="params file: data.competition, and the digest in the message (default: params.yaml)")
    ap.add_argument("-m", "--message", default=None, help="a note appended to the message (revision and params digest are always there)")
    ap.add_argument("--dry-run", action="store_true", help="validate and print the message, upload nothing")
    args = ap.parse_args(argv)
    params_file = Path(args.params)
    competition = load_params(params_file).data.competition
    n = check_submission(Path(args.file), Path(args.test_index))
    text = message(params_file, args.message)
    if args.dry_run:
        print(f"hcd submit: {args.file} is valid ({n} rows); would submit to {competition!r} with message {text!r}", file=sys.stderr)
        return
    said = submit(Path(args.file), competition, text)
    print(f"hcd submit: {args.file} ({n} rows) submitted to {competition!r} as {text!r}" + (f" — kaggle: {said}" if said else ""), file=sys.stderr)
