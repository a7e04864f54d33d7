"""Download sources, params validation and atomic writes."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO, make_archive, outputs

from hcd.atomic import atomic_path, write_json
from hcd.errors import HcdError
from hcd.pipeline.params import DataParams, ScanParams, load_params
from hcd.stages.download import download, from_dir
from hcd.stages.scan import scan


def test_zip_source_is_copied_and_checked(tiny_archive, tmp_path):
    dest = tmp_path / "raw/hcd.zip"
    download(DataParams(source="zip", path=str(tiny_archive)), dest, log=lambda m: None)
    assert dest.read_bytes() == tiny_archive.read_bytes()


def test_dir_source_is_packed_deterministically(tiny_archive, tmp_path):
    with zipfile.ZipFile(tiny_archive) as zf:
        zf.extractall(tmp_path / "folder")
    from_dir(str(tmp_path / "folder"), tmp_path / "a.zip")
    from_dir(str(tmp_path / "folder"), tmp_path / "b.zip")
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()
    scan(tmp_path / "a.zip", outputs(tmp_path / "a"), ScanParams(), log=lambda m: None)
    scan(tiny_archive, outputs(tmp_path / "b"), ScanParams(), log=lambda m: None)
    assert (tmp_path / "a/packed/train_x.npy").read_bytes() == (tmp_path / "b/packed/train_x.npy").read_bytes()


def test_zip_without_labels_fails_before_copying(small_set, tmp_path):
    train, labels, test = small_set
    arc = make_archive(tmp_path / "x.zip", train, labels, test, skip=("train_labels.csv",))
    dest = tmp_path / "raw/hcd.zip"
    dest.parent.mkdir()
    dest.write_bytes(b"previous")
    with pytest.raises(HcdError, match="no train_labels.csv"):
        download(DataParams(source="zip", path=str(arc)), dest, log=lambda m: None)
    assert dest.read_bytes() == b"previous"


def test_kaggle_without_credentials_says_how_to_fix(tmp_path, monkeypatch):
    for var in ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "nothing"))
    with pytest.raises(HcdError) as info:
        download(DataParams(source="kaggle"), tmp_path / "hcd.zip", log=lambda m: None)
    assert "kaggle.json" in str(info.value) and "\n" not in str(info.value)


def test_kaggle_key_never_appears_in_the_error(tmp_path, monkeypatch):
    secret = "f00dfacef00dfacef00dfacef00dface"
    cfg = tmp_path / "kaggle"
    cfg.mkdir()
    (cfg / "kaggle.json").write_text('{"username": "someone", "key": "%s"}' % secret)
    os.chmod(cfg / "kaggle.json", 0o600)
    (tmp_path / "p.yaml").write_text("data:\n  source: kaggle\n")
    proc = subprocess.run(
        [sys.executable, str(REPO / "workflow/scripts/download.py"), "--out", str(tmp_path / "hcd.zip"), "--params", str(tmp_path / "p.yaml")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "KAGGLE_CONFIG_DIR": str(cfg)},
    )  # offline here: the client fails to connect, as it would on a network error
    assert proc.returncode == 2
    assert secret not in proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("hcd download: error: kaggle:") and "Traceback" not in proc.stderr
    assert not (tmp_path / "hcd.zip").exists()


@pytest.mark.parametrize(
    "text, words",
    [
        ("data:\n  source: kagle\n", "data.source: Input should be"),
        ("scan:\n  dark_mx: 3\n", "scan.dark_mx: unknown key"),
        ("data:\n  source: zip\n", "data.path: must name the archive"),
        ("split: [1, 2\n", "not valid YAML"),
    ],
)
def test_params_errors_name_the_key(tmp_path, text, words):
    p = tmp_path / "params.yaml"
    p.write_text(text)
    with pytest.raises(HcdError) as info:
        load_params(p)
    assert words in str(info.value) and str(p) in str(info.value)


def test_stage_script_prints_one_line_not_a_traceback(tmp_path):
    (tmp_path / "params.yaml").write_text("data:\n  source: kagle\n")
    proc = subprocess.run([sys.executable, str(REPO / "workflow/scripts/download.py"), "--out", "data/raw/hcd.zip"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "data.source" in proc.stderr and not (tmp_path / "data").exists()


def test_atomic_write_keeps_the_previous_file_on_failure(tmp_path):
    dest = tmp_path / "out.json"
    write_json(dest, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_text('{"v": 2, "half')
            raise RuntimeError("killed mid-write")
    assert dest.read_text().strip().endswith("}") and '"v": 1' in dest.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"], "no temporary left behind"


def test_killed_stage_leaves_no_output_an_engine_would_take(tmp_path):
    """SIGKILL mid-write: the destination never exists half-written."""
    code = (
        "import os, signal\n"
        "from hcd.atomic import atomic_path\n"
        "with atomic_path('out.bin') as tmp:\n"
        "    tmp.write_bytes(b'x' * 1000)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -9
    assert not (tmp_path / "out.bin").exists()


def test_a_failed_commit_leaves_every_previous_output_not_a_mix(tmp_path):
    from hcd.atomic import Commit

    (tmp_path / "plots").mkdir()
    (tmp_path / "plots/old.json").write_text("old curve")
    write_json(tmp_path / "a.json", {"v": 1})
    write_json(tmp_path / "b.json", {"v": 1})
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(HcdError) as info:
        with Commit() as c:
            c.json(tmp_path / "a.json", {"v": 2})  # written completely...
            (c.dir(tmp_path / "plots") / "new.json").write_text("new curve")
            with open(c.path(tmp_path / "b.json"), "w") as fh:  # ...then the disk fills on the next output
                fh.write('{"v": 2')
                raise OSError(28, "No space left on device")
    assert "b.json: could not write (No space left on device); previous file left as it was" in str(info.value)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before, "all or nothing; no temporaries left"


def test_a_committed_folder_replaces_the_old_one_whole(tmp_path):
    from hcd.atomic import Commit, clean_stale_temps

    (tmp_path / "plots/roc").mkdir(parents=True)
    (tmp_path / "plots/roc/removed_backbone.json").write_text("stale")
    (tmp_path / ".plots.tmp-99-dead").mkdir()  # left by a kill
    clean_stale_temps(tmp_path / "plots")
    with Commit() as c:
        (c.dir(tmp_path / "plots") / "confusion.json").write_text("{}")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["plots", "plots/confusion.json"]
