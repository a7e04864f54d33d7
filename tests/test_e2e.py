"""The data stages through `dvc repro` and `snakemake` in temporary copies of the repo.

Both engines must produce byte-identical outputs, rerun exactly the stages a
params change affects, and Snakemake must not rerun anything after DVC has
rewritten every file with new modification times.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from hcd.pipeline import STAGES

pytestmark = pytest.mark.e2e

TINY_DATA = {"n_train": 240, "n_test": 30, "n_slides": 12}
ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "HCD_WORKERS": "2", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
OUTPUTS = [o for s in STAGES for o in s.outputs]


def sh(cwd: Path, *cmd: str) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def repo_copy(dest: Path, **changes) -> Path:
    """The working tree as git sees it (tracked + untracked-not-ignored), as a fresh git repo."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    set_params(dest, data={"demo": TINY_DATA}, **changes)
    sh(dest, "git", "init", "-q")
    sh(dest, "git", "add", "-A")
    sh(dest, "git", "commit", "-qm", "copy")
    return dest


def set_params(root: Path, **changes) -> None:
    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text())

    def merge(a: dict, b: dict) -> None:
        for k, v in b.items():
            if isinstance(v, dict):
                merge(a.setdefault(k, {}), v)
            else:
                a[k] = v

    merge(params, changes)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def digests(root: Path) -> dict[str, str]:
    return {o: hashlib.sha256((root / o).read_bytes()).hexdigest() for o in OUTPUTS}


def dvc_ran(log: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", log))


def snakemake_would_run(root: Path) -> set[str]:
    out = sh(root, "snakemake", "--dry-run", "--cores", "2")
    return set(re.findall(r"^(?:local)?rule (\w+):", out, re.M)) - {"all"}


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    dvc_root = repo_copy(tmp_path_factory.mktemp("dvc"))
    snake_root = repo_copy(tmp_path_factory.mktemp("snakemake"))
    dvc_log = sh(dvc_root, "dvc", "repro")
    snake_log = sh(snake_root, "snakemake", "--cores", "2")
    return dvc_root, snake_root, dvc_log, snake_log


def test_both_engines_run_every_stage_and_agree_byte_for_byte(engines):
    dvc_root, snake_root, dvc_log, _ = engines
    assert dvc_ran(dvc_log) == {s.name for s in STAGES}
    assert digests(dvc_root) == digests(snake_root)


def test_a_second_run_does_nothing(engines):
    dvc_root, snake_root, _, _ = engines
    assert dvc_ran(sh(dvc_root, "dvc", "repro")) == set()
    assert snakemake_would_run(snake_root) == set()


def test_a_split_param_reruns_split_and_stats_only_in_both_engines(engines):
    dvc_root, snake_root, _, _ = engines
    for root in (dvc_root, snake_root):
        set_params(root, split={"val_fraction": 0.25})
    assert snakemake_would_run(snake_root) == {"split", "stats"}
    assert dvc_ran(sh(dvc_root, "dvc", "repro")) == {"split", "stats"}
    sh(snake_root, "snakemake", "--cores", "2")
    assert digests(dvc_root) == digests(snake_root)
    assert '"val_fraction": 0.25' in (dvc_root / "metrics/split.json").read_text()


def test_a_scan_param_does_not_rerun_download(engines):
    dvc_root, snake_root, _, _ = engines
    for root in (dvc_root, snake_root):
        set_params(root, scan={"bright_min": 250})
    assert snakemake_would_run(snake_root) == {"scan", "split", "stats"}
    ran = dvc_ran(sh(dvc_root, "dvc", "repro"))
    assert "download" not in ran and "scan" in ran
    sh(snake_root, "snakemake", "--cores", "2")
    assert digests(dvc_root) == digests(snake_root)


def test_snakemake_survives_dvc_rewriting_every_file(engines):
    _, snake_root, _, _ = engines
    # DVC reproduces the same outputs in the Snakemake copy: every file gets a new mtime
    sh(snake_root, "dvc", "repro")
    for path in sorted((snake_root / "data").rglob("*"), reverse=True):  # inputs end up newer than outputs
        if path.is_file():
            os.utime(path)
    assert snakemake_would_run(snake_root) == set()


def test_dvc_metrics_show_reads_the_scan_summary(engines):
    dvc_root, _, _, _ = engines
    out = sh(dvc_root, "dvc", "metrics", "show")
    assert "metrics/scan.json" in out and "train.packed" in out
