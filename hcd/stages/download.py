"""Stage ``download``: bring the dataset into ``data/raw/hcd.zip``, one archive.

``data.source`` decides where it comes from:

* ``demo``   — the deterministic synthetic dataset (:mod:`hcd.synth`), offline;
* ``kaggle`` — the competition archive through the official ``kaggle`` client
  (credentials from ``~/.kaggle`` or the environment; the key is never printed
  or written anywhere by hcd);
* ``zip``    — a Kaggle-layout archive already on disk (``data.path``), copied;
* ``dir``    — an extracted Kaggle-layout folder (``data.path``), packed into a
  stored (uncompressed) zip in a fixed member order.

Whatever the source, the output is one zip in the Kaggle layout: DVC tracks one
file, never hundreds of thousands. A source replaced in place at the same path
is not noticed by either engine: rerun with ``dvc repro -f download`` or
``snakemake -R download``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

from hcd.atomic import atomic_path, clean_stale_temps
from hcd.data.source import DirSource, ZipSource
from hcd.errors import HcdError
from hcd.kaggleapi import authenticated_api, request_error, require_credentials
from hcd.pipeline.params import DataParams, load_params

KAGGLE_TMP_PREFIX = ".kaggle-download-"  # the client's scratch folder beside the output; removed on every start
_FIXED_DATE = (2019, 1, 1, 0, 0, 0)


def _check_layout(src: ZipSource | DirSource) -> None:
    """Fail early, with the file named, when the dataset is not in the Kaggle layout."""
    listing = src.listing()
    for name in ("train_labels.csv", "sample_submission.csv"):
        if src.read_meta(name) is None:
            raise HcdError(f"{src.label}: no {name} at the top level (expected the Kaggle histopathologic-cancer-detection layout)")
    if not listing.train:
        raise HcdError(f"{src.label}: train/ holds no <id>.tif patches")
    if not listing.test:
        raise HcdError(f"{src.label}: test/ holds no <id>.tif patches")


def from_zip(path: str, dest: Path) -> None:
    src = ZipSource(path)
    _check_layout(src)
    with atomic_path(dest) as tmp:
        shutil.copyfile(path, tmp)


def from_dir(path: str, dest: Path) -> None:
    src = DirSource(path)
    _check_layout(src)
    names = ["train_labels.csv", "sample_submission.csv"]
    for split in ("train", "test"):
        d = src.path / split
        names += sorted(f"{split}/{e.name}" for e in os.scandir(d) if e.is_file(follow_symlinks=False))
    with atomic_path(dest) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name in names:
            info = zipfile.ZipInfo(name, date_time=_FIXED_DATE)
            info.external_attr = 0o644 << 16
            with open(src.path / name, "rb") as fh, zf.open(info, "w", force_zip64=False) as out:
                shutil.copyfileobj(fh, out, 1 << 20)


def from_kaggle(competition: str, dest: Path) -> None:
    """Download the competition archive with the official client.

    Everything the client prints — its progress bar, and with ``VERBOSE=1`` or
    debug logging its request headers — passes through :func:`hcd.redact.redacted_output`,
    so no credential reaches the terminal or a log, whatever the environment.
    """
    require_credentials()
    from hcd.redact import Redactor, kaggle_secrets, redacted_output

    with redacted_output(Redactor(kaggle_secrets())):
        _kaggle_download(competition, dest)


def _kaggle_download(competition: str, dest: Path) -> None:
    api = authenticated_api()
    tmpdir = Path(tempfile.mkdtemp(prefix=KAGGLE_TMP_PREFIX, dir=dest.parent))
    try:
        try:
            with contextlib.redirect_stdout(sys.stderr):
                api.competition_download_files(competition, path=str(tmpdir), force=True, quiet=False)
        except (SystemExit, Exception) as exc:
            raise request_error(exc, competition, "download of") from None
        got = sorted(tmpdir.glob("*.zip"))
        if len(got) != 1:
            raise HcdError(f"kaggle: expected one zip archive from the download, found {len(got)}")
        _check_layout(ZipSource(got[0]))
        with atomic_path(dest) as tmp:
            os.replace(got[0], tmp)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def download(data: DataParams, dest: str | os.PathLike[str], log=print) -> None:
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(dest)
    for stale in dest.parent.glob(KAGGLE_TMP_PREFIX + "*"):  # a download killed by a signal hcd could not catch
        shutil.rmtree(stale, ignore_errors=True)
    if data.source == "demo":
        from hcd.data.synth import write_archive

        d = data.demo
        log(f"download: generating the demo dataset ({d.n_train} train + {d.n_test} test patches, seed {d.seed})")
        write_archive(dest, d)
    elif data.source == "zip":
        log(f"download: copying {data.path}")
        from_zip(str(data.path), dest)
    elif data.source == "dir":
        log(f"download: packing {data.path} into one archive")
        from_dir(str(data.path), dest)
    elif data.source == "kaggle":
        log(f"download: fetching {data.competition!r} with the kaggle client")
        from_kaggle(data.competition, dest)
    else:  # pragma: no cover - the schema allows only the four
        raise HcdError(f"params.yaml: data.source: unknown source {data.source!r}")
    log(f"download: wrote {dest} ({dest.stat().st_size / 2**20:.1f} MiB)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="hcd download", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="the archive to write, in the Kaggle layout (data/raw/hcd.zip)")
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml; reads data.*)")
    args = ap.parse_args(argv)
    download(load_params(args.params).data, args.out, log=lambda m: print(m, file=sys.stderr))
