"""Security and correctness, round 2: what a hostile config, a crashed run or a careless input must not get through.

One test (or parametrised case) per example of the issue, at the unit level;
the attacks whose path is an engine (a backbone name through ``dvc repro`` and
``dvc exp run -S``, an overlay through ``hcd params flags``) run through the
real engines in ``tests/test_attacks.py``.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, hexid, make_archive, training_arrays, with_model_entries

from hcd.errors import HcdError, excerpt
from hcd.pipeline.params import Params, load_params
from hcd.pipeline.table import packed_args

PY = [sys.executable, "-m", "hcd"]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HCD_THREADS": "1", "HCD_WORKERS": "1"}


def hcd(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*PY, *args], cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in lines if ": error: " in line]
    assert "Traceback" not in proc.stderr and errors == lines[-1:], proc.stderr[-2000:]  # progress lines, then one error line
    err = errors[0]
    for w in words:
        assert w in err, (w, err)
    return err


def write_params(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(with_model_entries(raw)))
    return path


# ----------------------------------------------------------------------------- 1, 2, 14: params values


@pytest.mark.parametrize(
    "name",
    ["x;touch /tmp/pwned;#", "x;{touch,/tmp/pwned};#", "$(touch pwned)", "`id`", "a b", "..", ".", ".hidden", "-rf", "../../../../some/dir", "models/../x", "a\nb", "ensemble", "é"],
)
def test_a_backbone_name_that_is_not_one_safe_path_component_is_refused(tmp_path, name):
    with pytest.raises(HcdError, match=r"backbones: .* is not a usable name"):
        load_params(write_params(tmp_path / "params.yaml", {"backbones": ["cnn", name]}))


@pytest.mark.parametrize(
    "raw, words",
    [
        ({"seed": 2**64}, "seed: Input should be less than or equal to 4294967295"),
        ({"seed": -1}, "seed: Input should be greater than or equal to 0"),
        ({"split": {"seed": 2**70}}, "split.seed"),
        ({"train": {"warmup_epochs": float("inf")}}, "train.warmup_epochs: Input should be a finite number"),
        ({"lr": float("nan")}, "lr: Input should be a finite number"),
        ({"split": {"val_fraction": 0.001}}, "split.val_fraction: Input should be greater than or equal to 0.01"),
        ({"split": {"val_fraction": 0.999}}, "split.val_fraction: Input should be less than or equal to 0.5"),
        ({"train": {"pos_weight": -1.0}}, "train.pos_weight: Input should be greater than 0"),
        ({"train": {"pos_weight": 0}}, "train.pos_weight"),
        ({"metrics": {"bootstrap": 10**9}}, "metrics.bootstrap"),
        ({"predict": {"batch_size": 10**9}}, "predict.batch_size"),
        ({"split": {"groups": "/etc/passwd"}}, "split.groups: '/etc/passwd' must be a file data/groups/<name>.csv"),
        ({"split": {"groups": "data/groups/../../x.csv"}}, "split.groups"),
        ({"split": {"groups": "../outside.csv"}}, "split.groups"),
        ({"data": {"competition": "x;rm -rf ~"}}, "data.competition"),
        ({"models": {"x\x1b[2J": {}}}, "models: 'x\\x1b[2J' is not in backbones"),
    ],
)
def test_every_number_and_path_is_bounded_with_one_line(tmp_path, raw, words):
    with pytest.raises(HcdError) as info:
        load_params(write_params(tmp_path / "params.yaml", raw))
    assert words in str(info.value) and "\n" not in str(info.value)


def test_the_check_stage_refuses_a_bad_value_and_writes_nothing(tmp_path):
    write_params(tmp_path / "params.yaml", {"backbones": ["cnn", "x;touch pwned;#"]})
    proc = hcd("check", "params.yaml", "--out", "data/check/params.json", cwd=tmp_path)
    one_line_error(proc, "hcd check: error: params.yaml: backbones:")
    assert not (tmp_path / "data").exists() and not (tmp_path / "pwned").exists()
    write_params(tmp_path / "params.yaml", {"backbones": ["cnn"]})
    assert hcd("check", "params.yaml", "--out", "data/check/params.json", cwd=tmp_path).returncode == 0
    first = (tmp_path / "data/check/params.json").read_bytes()
    write_params(tmp_path / "params.yaml", {"backbones": ["cnn"], "lr": 0.01})
    assert hcd("check", "params.yaml", "--out", "data/check/params.json", cwd=tmp_path).returncode == 0
    assert (tmp_path / "data/check/params.json").read_bytes() == first, "the marker holds no values: a valid change reruns nothing by itself"


def test_every_stage_but_check_depends_on_the_check(tmp_path):
    from hcd.pipeline.table import CHECKED, STAGES

    assert STAGES[0].name == "check" and "params.yaml" in STAGES[0].deps
    assert all(CHECKED in s.deps for s in STAGES[1:])


def test_params_flags_validates_exactly_as_apply(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    evil = tmp_path / "overlay.yaml"
    evil.write_text('backbones: [cnn, "x;{touch,/tmp/hcd-pwned-flags};#"]\n')
    for action in ("flags", "apply"):
        proc = hcd("params", action, str(evil), cwd=tmp_path)
        one_line_error(proc, f"{evil}: backbones:", "is not a usable name")
        assert proc.stdout == ""
    assert (tmp_path / "params.yaml").read_text() == (REPO / "params.yaml").read_text()
    spaced = tmp_path / "spaced.yaml"
    spaced.write_text('data: {source: zip, path: "/my data/x.zip"}\n')
    one_line_error(hcd("params", "flags", str(spaced), cwd=tmp_path), "white space", "hcd params apply")
    ok = hcd("params", "flags", str(REPO / "configs/notebook-A.yaml"), cwd=tmp_path)
    assert ok.returncode == 0 and ok.stdout.startswith("-S ")


def test_an_overlay_that_changes_the_backbones_changes_the_models_entries_alike_through_apply_and_dvc(tmp_path):
    """A params file holds one models entry per backbone. `hcd params apply` adds the new backbones' entries and
    drops the old ones; `eval "dvc exp run $(hcd params flags …)"` (real DVC, on a one-stage pipeline tracking
    models.<name> per backbone as train does) ends on the same params."""
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("backbones: [resnet10t, resnet18]\nmodels: {resnet18: {lr: 0.001}}\n")
    applied = tmp_path / "applied"
    applied.mkdir()
    (applied / "params.yaml").write_text((REPO / "params.yaml").read_text())
    assert hcd("params", "apply", str(overlay), cwd=applied).returncode == 0
    want = yaml.safe_load((applied / "params.yaml").read_text())
    assert want["backbones"] == ["resnet10t", "resnet18"] and want["models"] == {"resnet10t": {}, "resnet18": {"lr": 0.001}}
    flags = shlex.split(hcd("params", "flags", str(overlay), cwd=REPO).stdout)  # shell words, quoted by shlex.join
    assert flags[:4] == ["-S", "~models.cnn", "-S", "++backbones=[\"resnet10t\",\"resnet18\"]"], flags
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (ws / "dvc.yaml").write_text("stages:\n  t:\n    foreach: ${backbones}\n    do:\n      cmd: echo ${item} > ${item}.txt\n      params:\n      - models.${item}\n      outs:\n      - ${item}.txt\n")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"], ["dvc", "exp", "run", *flags]):
        proc = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, (cmd, proc.stdout[-1500:], proc.stderr[-1500:])
    got = yaml.safe_load((ws / "params.yaml").read_text())
    assert got == want
    assert sorted(p.name for p in ws.glob("*.txt")) == ["resnet10t.txt", "resnet18.txt"]


# ----------------------------------------------------------------------------- 3: the Kaggle key


def _port_80_free() -> bool:
    try:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", 80))
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def kaggle_world(tmp_path_factory):
    """A fake key in kaggle.json and the environment, a tiny demo archive to serve."""
    from conftest import TINY

    from hcd.data.synth import write_archive

    root = tmp_path_factory.mktemp("kaggle")
    write_archive(root / "served.zip", TINY)
    key = secrets.token_hex(16)
    (root / "cfg").mkdir()
    (root / "cfg/kaggle.json").write_text(json.dumps({"username": "hcd-test", "key": key}))
    os.chmod(root / "cfg/kaggle.json", 0o600)
    write_params(root / "params.yaml", {"data": {"source": "kaggle"}})
    return root, key


VERBOSITY = {
    "VERBOSE=1": {"VERBOSE": "1"},
    "VERBOSE_OUTPUT=true": {"VERBOSE_OUTPUT": "true"},
    "http.client debuglevel 1": {"HCD_TEST_HTTP_DEBUG": "1"},
}


@pytest.mark.skipif(not _port_80_free(), reason="needs to bind 127.0.0.1:80 for the client's LOCALHOST endpoint (root)")
@pytest.mark.parametrize("status", [200, 403, 401])
@pytest.mark.parametrize("verbosity", list(VERBOSITY), ids=list(VERBOSITY))
def test_the_kaggle_key_never_appears_with_the_clients_verbose_and_debug_output(kaggle_world, tmp_path, status, verbosity):
    """The real client talks HTTP to a local stand-in for Kaggle (its LOCALHOST endpoint), printing its request headers."""
    from kaggle_fake import FakeKaggle

    root, key = kaggle_world
    env = {**ENV, "KAGGLE_API_ENVIRONMENT": "LOCALHOST", "KAGGLE_CONFIG_DIR": str(root / "cfg"), "KAGGLE_USERNAME": "hcd-test", "KAGGLE_KEY": key, **VERBOSITY[verbosity]}
    # http.client's own debug switch has no environment variable: set it before the stage runs
    code = "import os, http.client, sys\nif os.environ.get('HCD_TEST_HTTP_DEBUG'): http.client.HTTPConnection.debuglevel = 1\nfrom hcd.cli import main\nmain(sys.argv[1:])"
    with FakeKaggle(root / "served.zip", status) as server:
        proc = subprocess.run([sys.executable, "-c", code, "download", "--out", str(tmp_path / "raw/hcd.zip"), "--params", str(root / "params.yaml")], env=env, capture_output=True, text=True, timeout=300)
    printed = proc.stdout + proc.stderr
    assert server.auth_headers, "the client sent no credentials: the test would prove nothing"
    forms = [key, base64.b64encode(f"hcd-test:{key}".encode()).decode(), base64.b64encode(key.encode()).decode()]
    assert not [f for f in forms if f in printed], "the Kaggle key was printed"
    if verbosity != "http.client debuglevel 1":
        assert "Authorization: ***" in printed, "the client's verbose output did not run: the test would prove nothing"
    if status == 200:
        assert proc.returncode == 0, printed[-2000:]
        assert (tmp_path / "raw/hcd.zip").read_bytes() == (root / "served.zip").read_bytes()
    else:
        assert proc.returncode == 2 and ("rules" in proc.stderr if status == 403 else "rejected" in proc.stderr)
        assert not (tmp_path / "raw/hcd.zip").exists()
    assert not list((tmp_path / "raw").glob(".kaggle-*")), "the client's scratch folder is removed"


@pytest.mark.skipif(not _port_80_free(), reason="needs to bind 127.0.0.1:80 for the client's LOCALHOST endpoint (root)")
@pytest.mark.parametrize("status", [200, 403, 401])
def test_hcd_submit_uploads_with_the_official_client_and_never_prints_the_key(kaggle_world, tmp_path, status):
    """`hcd submit` through the real client against the local stand-in, verbose on: upload, message, errors."""
    from kaggle_fake import FakeKaggle

    root, key = kaggle_world
    ids = [f"{i:040x}" for i in range(5)]
    (tmp_path / "test_index.csv").write_text("row,id\n" + "".join(f"{i},{x}\n" for i, x in enumerate(ids)))
    (tmp_path / "submission.csv").write_text("id,label\n" + "".join(f"{x},0.{i}\n" for i, x in enumerate(ids)))
    env = {**ENV, "KAGGLE_API_ENVIRONMENT": "LOCALHOST", "KAGGLE_CONFIG_DIR": str(root / "cfg"), "KAGGLE_USERNAME": "hcd-test", "KAGGLE_KEY": key, "VERBOSE": "1"}
    cmd = [sys.executable, "-m", "hcd", "submit", "--file", str(tmp_path / "submission.csv"), "--test-index", str(tmp_path / "test_index.csv"), "--params", str(root / "params.yaml"), "-m", "first try"]
    with FakeKaggle(root / "served.zip", status) as server:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    printed = proc.stdout + proc.stderr
    assert server.auth_headers, "the client sent no credentials: the test would prove nothing"
    forms = [key, base64.b64encode(f"hcd-test:{key}".encode()).decode(), base64.b64encode(key.encode()).decode()]
    assert not [f for f in forms if f in printed], "the Kaggle key was printed"
    if status == 200:
        assert proc.returncode == 0, printed[-2000:]
        assert server.uploaded == (tmp_path / "submission.csv").read_bytes()
        (body,) = server.submissions
        assert b"first try" in body and b"params " in body and b"blob-token-1" in body
        assert "submitted to 'histopathologic-cancer-detection'" in proc.stderr
    else:
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("hcd submit: error: kaggle:")
        assert ("rules" in proc.stderr if status == 403 else "rejected" in proc.stderr)
        assert server.uploaded is None


@pytest.mark.parametrize(
    "text, words",
    [
        ("id,prob\n", "header must be 'id,label'"),
        ("id,label\n" + f"{1:040x},0.5\n", "ids missing"),
        ("id,label\n" + "".join(f"{i:040x},1.5\n" for i in range(2)), "labels must be probabilities"),
    ],
)
def test_hcd_submit_refuses_an_invalid_file_before_any_upload(tmp_path, text, words):
    (tmp_path / "test_index.csv").write_text("row,id\n" + "".join(f"{i},{i:040x}\n" for i in range(2)))
    (tmp_path / "submission.csv").write_text(text)
    (tmp_path / "params.yaml").write_text("data:\n  source: kaggle\n")
    env = {k: v for k, v in ENV.items() if not k.startswith("KAGGLE")}
    proc = subprocess.run([sys.executable, "-m", "hcd", "submit", "--file", "submission.csv", "--test-index", "test_index.csv"], cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert proc.returncode == 2 and words in proc.stderr and proc.stderr.count("\n") == 1


def test_hcd_submit_without_credentials_says_how_to_fix(tmp_path):
    (tmp_path / "test_index.csv").write_text("row,id\n0," + "0" * 40 + "\n")
    (tmp_path / "submission.csv").write_text("id,label\n" + "0" * 40 + ",0.3\n")
    (tmp_path / "params.yaml").write_text("data:\n  source: kaggle\n")
    env = {**{k: v for k, v in ENV.items() if not k.startswith("KAGGLE")}, "KAGGLE_CONFIG_DIR": str(tmp_path / "none"), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "hcd", "submit", "--file", "submission.csv", "--test-index", "test_index.csv"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == "hcd submit: error: kaggle: no credentials — create a token at https://www.kaggle.com/settings/api and save it as ~/.kaggle/kaggle.json (chmod 600) or set KAGGLE_API_TOKEN"
    dry = subprocess.run([sys.executable, "-m", "hcd", "submit", "--file", "submission.csv", "--test-index", "test_index.csv", "--dry-run"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert dry.returncode == 0 and "is valid (1 rows)" in dry.stderr and "params " in dry.stderr


def test_the_redactor_masks_secrets_their_base64_and_any_authorization_header():
    from hcd.redact import Redactor

    r = Redactor(["k3y-s3cret", "me:k3y-s3cret"])
    text = "key=k3y-s3cret\nAuthorization: Basic " + base64.b64encode(b"me:k3y-s3cret").decode() + "\n{'Authorization': 'Bearer abc.def'}\nproxy-authorization=xyz"
    out = r(text)
    assert "k3y-s3cret" not in out and "abc.def" not in out and "xyz" not in out and base64.b64encode(b"me:k3y-s3cret").decode() not in out


def test_redacted_output_covers_c_level_writes_and_logging(tmp_path):
    code = (
        "import os, logging, sys\n"
        "from hcd.redact import Redactor, redacted_output\n"
        "logging.basicConfig(level=logging.DEBUG)\n"  # a handler made before the redirection
        "with redacted_output(Redactor(['TOPSECRET123'])):\n"
        "    print('py TOPSECRET123'); logging.debug('log TOPSECRET123'); sys.stdout.flush()\n"
        "    os.write(1, b'fd1 TOPSECRET123\\n'); os.write(2, b'fd2 Authorization: Bearer zzz\\r50%\\r')\n"
        "print('after')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "TOPSECRET123" not in out and "zzz" not in out
    assert out.count("***") == 4 and "after" in proc.stdout and "50%" in out


# ----------------------------------------------------------------------------- 4, 15: folder sources


@pytest.fixture
def kaggle_dir(tmp_path, small_set):
    train, labels, test = small_set
    root = tmp_path / "src"
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    (root / "train_labels.csv").write_text(labels)
    (root / "sample_submission.csv").write_text("id,label\n" + "".join(f"{k},0\n" for k in test))
    for k, v in train.items():
        (root / "train" / f"{k}.tif").write_bytes(v)
    for k, v in test.items():
        (root / "test" / f"{k}.tif").write_bytes(v)
    return root


def _scan(src: Path, out: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return hcd("scan", str(src), "--report", str(out / "report.csv"), "--summary", str(out / "scan.json"), *packed_args(out / "packed"), "--params", str(REPO / "params.yaml"), cwd=out.parent, timeout=timeout)


@pytest.mark.parametrize("where", ["train_labels.csv", "sample_submission.csv", "train", "patch"])
def test_a_symlink_anywhere_in_a_folder_source_is_refused_and_its_target_never_echoed(kaggle_dir, tmp_path, where):
    secret = tmp_path / "credentials"
    secret.write_text("aws_secret_access_key=SHOULD-NEVER-BE-PRINTED\n")
    if where == "train":
        (kaggle_dir / "train").rename(tmp_path / "real-train")
        (kaggle_dir / "train").symlink_to(tmp_path / "real-train")
        target = kaggle_dir / "train"
    elif where == "patch":
        target = next((kaggle_dir / "train").iterdir())
        target.unlink()
        target.symlink_to(secret)
    else:
        target = kaggle_dir / where
        target.unlink()
        target.symlink_to(secret)
    out = tmp_path / "out"
    out.mkdir()
    for proc in (_scan(kaggle_dir, out), hcd("download", "--out", str(out / "raw.zip"), "--params", str(write_params(tmp_path / "p.yaml", {"data": {"source": "dir", "path": str(kaggle_dir)}})))):
        err = one_line_error(proc, str(target), "symbolic link")
        assert "SHOULD-NEVER" not in err and "aws_secret" not in proc.stderr
    assert not (out / "packed").exists() and not (out / "raw.zip").exists()


def test_a_header_error_echoes_a_short_sanitised_excerpt_only(tmp_path, small_set):
    train, _, test = small_set
    labels = "\x1b[2J" + "A" * 500 + ",secret\n"
    arc = make_archive(tmp_path / "in.zip", train, labels, test)
    err = one_line_error(_scan(arc, tmp_path / "out"), "expected header 'id,label'")
    assert "\x1b" not in err and "A" * 60 not in err and "secret" not in err
    assert excerpt("\x1b[2J" + "A" * 100) == "'\\x1b[2J" + "A" * 36 + "…'"  # 40 characters, escaped


def test_a_fifo_named_like_a_patch_is_flagged_not_read(kaggle_dir, tmp_path):
    fifo = kaggle_dir / "train" / f"{hexid(99)}.tif"
    os.mkfifo(fifo)
    (kaggle_dir / "train_labels.csv").write_text((kaggle_dir / "train_labels.csv").read_text() + f"{hexid(99)},1\n")
    out = tmp_path / "out"
    out.mkdir()
    proc = _scan(kaggle_dir, out, timeout=120)  # before the fix, this blocked forever
    assert proc.returncode == 0, proc.stderr
    report = pd.read_csv(out / "report.csv", dtype=str)
    row = report[report["id"] == hexid(99)].iloc[0]
    assert row["reason"] == "undecodable" and "not a regular file" in row["detail"]


# ----------------------------------------------------------------------------- 16: memory bombs in tables


def test_a_labels_csv_that_inflates_past_the_cap_is_refused_unread(tmp_path, small_set):
    import zipfile

    train, labels, test = small_set
    arc = make_archive(tmp_path / "in.zip", train, labels, test, skip=("train_labels.csv",))
    with zipfile.ZipFile(arc, "a", zipfile.ZIP_DEFLATED) as zf, zf.open("train_labels.csv", "w", force_zip64=True) as fh:
        fh.write(labels.encode())
        row = (hexid(0) + ",1\n").encode() * 20000
        for _ in range(90):  # ~76 MB of rows, ~0.2 MB compressed
            fh.write(row)
    assert arc.stat().st_size < 2_000_000
    one_line_error(_scan(arc, tmp_path / "out"), "train_labels.csv", "MiB")


def test_a_single_huge_header_line_is_refused(tmp_path, small_set):
    train, _, test = small_set
    arc = make_archive(tmp_path / "in.zip", train, "id" + "x" * 3_000_000 + ",label\n", test)
    one_line_error(_scan(arc, tmp_path / "out"), "train_labels.csv: line 1 is longer than 1024 characters")


# ----------------------------------------------------------------------------- 5, 6: silent wrong results


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return training_arrays(tmp_path_factory.mktemp("tiny"), 48)


def _train(root: Path, out: Path, split: str = "split.csv", **cfg):
    from hcd.stages.train import train

    p = Params.model_validate({"backbones": ["cnn"], "train": {"epochs": 1, "batch_size": 16, "crop": 32, "patience": 0, **cfg}})
    return train("cnn", p, root / "x.npy", root / "index.csv", root / split, root / "stats.json", out, out / "live", log=lambda m: None)


def test_a_batch_larger_than_the_training_side_is_refused_before_training(tiny_data, tmp_path):
    with pytest.raises(HcdError, match=r"batch size 64 is larger than the 32 training patches, so no step would be taken; set models.cnn.batch_size \(or train.batch_size\) to 32 or lower"):
        _train(tiny_data, tmp_path / "m", batch_size=64)
    assert not (tmp_path / "m/model.safetensors").exists()


def test_a_model_that_took_no_step_is_never_written(tiny_data, tmp_path, monkeypatch):
    import hcd.stages.train

    monkeypatch.setattr(hcd.stages.train, "train_steps", lambda *a, **k: (0.0, 0))
    with pytest.raises(HcdError, match="took no training step"):
        _train(tiny_data, tmp_path / "m")
    assert not (tmp_path / "m/model.safetensors").exists()


def test_a_one_class_validation_side_never_reaches_training(tiny_data, tmp_path):
    s = pd.read_csv(tiny_data / "split.csv", dtype={"id": str})
    s.loc[(s["side"] == "val") & (s["label"] == 1), "side"] = "train"
    s.to_csv(tiny_data / "oneclass.csv", index=False)
    with pytest.raises(HcdError, match="the validation side holds 8 negative and 0 positive patches; both classes are needed"):
        _train(tiny_data, tmp_path / "m", split="oneclass.csv")


def _index(n: int, pos: np.ndarray | None = None) -> pd.DataFrame:
    y = (np.arange(n) % 2) if pos is None else pos
    return pd.DataFrame({"row": np.arange(n), "id": [f"{i:040x}" for i in range(n)], "label": y.astype(int)})


def test_groups_that_leave_validation_with_one_class_are_refused():
    from hcd.pipeline.params import SplitParams
    from hcd.stages.split import split

    idx = _index(40, np.array([0] * 20 + [1] * 20))
    groups = np.array([f"g{i // 4}" for i in range(40)])  # each slide holds one class
    with pytest.raises(HcdError, match=r"split: the (validation|training) side by the groups in data/groups/g.csv holds \d+ negative and \d+ positive patches"):
        split(idx, SplitParams(val_fraction=0.1, groups="data/groups/g.csv"), groups, warn=lambda m: None)


def test_two_groups_cannot_make_a_ten_percent_validation_side():
    from hcd.pipeline.params import SplitParams
    from hcd.stages.split import split

    idx = _index(40)
    groups = np.array(["a"] * 20 + ["b"] * 20)  # both classes in each
    with pytest.raises(HcdError, match=r"split: 2 groups in data/groups/g.csv give a validation side of 50.0% against split.val_fraction 0.1; a grouped split at that fraction needs about 10 groups"):
        split(idx, SplitParams(val_fraction=0.1, groups="data/groups/g.csv"), groups, warn=lambda m: None)


def test_groups_that_track_the_label_are_warned_about_with_numbers():
    from hcd.pipeline.params import SplitParams
    from hcd.stages.split import split

    rng = np.random.default_rng(1)
    groups = np.array([f"g{i}" for i in range(20) for _ in range(10)])
    rate = np.repeat(np.where(np.arange(20) % 2 == 0, 0.95, 0.05), 10)  # slides mostly of one class
    y = (rng.random(200) < rate).astype(int)
    warnings: list[str] = []
    split(_index(200, y), SplitParams(val_fraction=0.2, groups="data/groups/g.csv"), groups, warn=warnings.append)
    assert any("explain" in w and "of the label variance" in w for w in warnings), warnings


@pytest.mark.parametrize("fraction, n", [(0.01, 40), (0.05, 20)])
def test_a_val_fraction_the_data_cannot_honour_is_one_line(fraction, n):
    from hcd.pipeline.params import SplitParams
    from hcd.stages.split import split

    with pytest.raises(HcdError, match="split: "):
        split(_index(n), SplitParams(val_fraction=fraction), None, warn=lambda m: None)


# ----------------------------------------------------------------------------- 7, 14: hcd score


@pytest.mark.parametrize(
    "sub, labels, words",
    [
        ("id,label\na,0.9\na,0.2\nb,0.1\n", "id,label\na,1\nb,0\n", "sub.csv: id 'a' appears 2 times; each id once"),
        ("id,label\na,0.9\nb,0.1\n", "id,label\na,1\na,1\nb,0\n", "labels.csv: id 'a' appears 2 times"),
        ("id,label\na,0.9\nb,0.1\n", "id,label\na,yes\nb,0\n", "labels.csv: label 'yes' of id 'a' is not 0 or 1"),
        ("id,label\na,0.9\nb,0.1\n", "id,label\na,2\nb,0\n", "label '2' of id 'a' is not 0 or 1"),
        ("id,label\na,inf\nb,0.1\n", "id,label\na,1\nb,0\n", "sub.csv: label 'inf' of id 'a' is not a finite number"),
        ("id,label\na,0.9\nb,0.1\n", "", "labels.csv: empty file"),
        ("id,label\na,0.9\nb,0.1\n", b"id,label\n\xe9t\xe9,1\n", "labels.csv: not UTF-8 text"),
        ("id,label\na,0.9\nb,0.1\n", "id,label\na,1\nb,1\n", "every label is 1; AUC needs both classes"),
        ("id,label\na,0.9\nb,0.1\n", b"PK\x03\x04zip", "labels.csv: a zip archive, not a CSV"),
    ],
)
def test_score_refuses_what_would_give_a_wrong_auc(tmp_path, sub, labels, words):
    (tmp_path / "sub.csv").write_bytes(sub.encode() if isinstance(sub, str) else sub)
    (tmp_path / "labels.csv").write_bytes(labels.encode() if isinstance(labels, str) else labels)
    one_line_error(hcd("score", "sub.csv", "labels.csv", cwd=tmp_path), words)


def test_score_takes_a_backbones_prediction_file(tmp_path):
    (tmp_path / "test.csv").write_text("id,prob\na,0.9\nb,0.1\nc,0.8\n")
    (tmp_path / "labels.csv").write_text("id,label\na,1\nb,0\nc,0\n")
    proc = hcd("score", "test.csv", "labels.csv", "--bootstrap", "10", cwd=tmp_path)
    assert proc.returncode == 0 and "AUC 1.0000" in proc.stdout and "n=3" in proc.stdout


@pytest.mark.parametrize("var, value", [("HCD_THREADS", "abc"), ("HCD_THREADS", "0"), ("HCD_WORKERS", "-2"), ("HCD_DEVICE", "cuda;rm"), ("HCD_IN_MEMORY_BYTES", "lots"), ("HCD_GPU_DATA_FRACTION", "nan")])
def test_every_environment_variable_is_parsed_with_one_line(var, value):
    from hcd import env

    getter = {"HCD_THREADS": env.threads, "HCD_WORKERS": env.workers, "HCD_DEVICE": env.env_device, "HCD_IN_MEMORY_BYTES": env.in_memory_bytes, "HCD_GPU_DATA_FRACTION": env.gpu_data_fraction}[var]
    old = os.environ.get(var)
    os.environ[var] = value
    try:
        with pytest.raises(HcdError, match=f"^{var}="):
            getter()
    finally:
        os.environ.pop(var) if old is None else os.environ.__setitem__(var, old)


# ----------------------------------------------------------------------------- 8: model.json


@pytest.mark.parametrize(
    "change, words",
    [
        ({"crop": 200}, "model.json: crop: Input should be less than or equal to 96"),
        ({"std": [0, 0.2, 0.2]}, "model.json: std.0: Input should be greater than or equal to 0.001"),
        ({"upscale": 100000}, "model.json: upscale: Input should be less than or equal to 512"),
        ({"mean": [0.5, "x", 0.5]}, "model.json: mean.1"),
        ({"backbone": "../../x"}, "model.json: backbone: '../../x' is not a usable name"),
        ({"crop": None}, "model.json: crop"),
    ],
)
def test_a_tampered_model_json_is_refused_with_one_line(tmp_path, change, words):
    from hcd.model.weights import read_model_meta

    meta = {"backbone": "cnn", "crop": 64, "upscale": None, "mean": [0.5] * 3, "std": [0.2] * 3, "best_epoch": 2, "history": []}
    meta.update(change)
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(HcdError) as info:
        read_model_meta(tmp_path / "model.json")
    assert words in str(info.value)


def test_a_model_json_missing_a_key_is_refused(tmp_path):
    from hcd.model.weights import read_model_meta

    (tmp_path / "model.json").write_text(json.dumps({"backbone": "cnn", "crop": 64, "upscale": None, "mean": [0.5] * 3, "std": [0.2] * 3}))
    with pytest.raises(HcdError, match="model.json: best_epoch: Field required"):
        read_model_meta(tmp_path / "model.json")


# ----------------------------------------------------------------------------- 9: the run key


def test_the_run_key_covers_every_byte_of_the_packed_array_and_the_thread_count(tmp_path):
    from hcd.model.checkpoint import run_key

    x = np.zeros((64, 96, 96, 3), np.uint8)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "i.csv").write_text("row,id\n")
    settings = {"threads": 2}
    base = run_key(settings, tmp_path / "x.npy", [tmp_path / "i.csv"])
    assert run_key({"threads": 1}, tmp_path / "x.npy", [tmp_path / "i.csv"]) != base
    for row in (0, 17, 63):  # the old sampled digest read ~45 % of this file: some rows went unseen
        y = x.copy()
        y[row, 50, 50, 1] = 1
        np.save(tmp_path / "x.npy", y)
        assert run_key(settings, tmp_path / "x.npy", [tmp_path / "i.csv"]) != base, row
    np.save(tmp_path / "x.npy", x)
    assert run_key(settings, tmp_path / "x.npy", [tmp_path / "i.csv"]) == base


def test_training_puts_its_thread_count_into_the_run_key(monkeypatch):
    import inspect

    import hcd.stages.train

    assert '"threads": threads' in inspect.getsource(hcd.stages.train.train)


# ----------------------------------------------------------------------------- 10, 11, 17: commits, signals, names


def test_a_kill_among_a_commits_renames_is_rolled_forward_to_the_new_set(tmp_path):
    """SIGKILL after the first of three renames: the journal finishes them at the next stage start."""
    from hcd.atomic import replay_journals, write_json

    for n in "abc":
        write_json(tmp_path / f"{n}.json", {"v": "old"})
    code = (
        "import os, signal\n"
        "real = os.replace\n"
        "count = [0]\n"
        "def dying(src, dst):\n"
        "    real(src, dst)\n"
        "    if '.tmp-' in str(src) and os.path.basename(dst) in ('a.json', 'b.json', 'c.json'):\n"
        "        count[0] += 1\n"
        "        if count[0] == 1: os.kill(os.getpid(), signal.SIGKILL)\n"
        "os.replace = dying\n"
        "from hcd.atomic import Commit\n"
        "with Commit() as c:\n"
        "    for n in 'abc': c.json(n + '.json', {'v': 'new'})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=ENV)
    assert proc.returncode == -9
    values = sorted(json.loads((tmp_path / f"{n}.json").read_text())["v"] for n in "abc")
    assert values == ["new", "old", "old"], "the kill landed among the renames"
    assert len(list((tmp_path / ".hcd/journal").glob("*.json"))) == 1
    assert replay_journals(tmp_path / ".hcd/journal")
    assert [json.loads((tmp_path / f"{n}.json").read_text())["v"] for n in "abc"] == ["new"] * 3
    assert not list(tmp_path.glob(".*.tmp-*")) and not list((tmp_path / ".hcd/journal").glob("*.json"))


def test_sigterm_removes_every_temporary_and_keeps_the_previous_outputs(tmp_path, tiny_archive):
    out = tmp_path / "out"
    out.mkdir()
    assert _scan(tiny_archive, out).returncode == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = subprocess.Popen([*PY, "scan", str(tiny_archive), "--report", str(out / "report.csv"), "--summary", str(out / "scan.json"), *packed_args(out / "packed"), "--params", str(REPO / "params.yaml")], cwd=tmp_path, env=ENV, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "packed").glob(".*.tmp-*")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the scan finished before SIGTERM arrived")
    assert proc.returncode == 143 and "terminated (SIGTERM)" in err and "Traceback" not in err
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name], "temporaries left behind"
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_process_forked_from_a_stage_ends_on_sigterm_instead_of_unwinding_the_stage():
    """Pools end their workers with SIGTERM. A worker forked from a stage inherits its unwinding handler, which
    once left the demo generator's queue lock taken and download hanging: in a forked child it now ends the
    child as SIGTERM's default would (killed by the signal, not exit 3 after raising), the stage unaffected."""
    code = (
        "import os, signal, time\n"
        "from hcd.cli import run_stage\n"
        "def stage(argv):\n"
        "    r, w = os.pipe()\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        try:\n"
        "            os.write(w, b'up')\n"  # a signal before the child's own start-up ends is dropped by CPython
        "            time.sleep(60)\n"
        "        finally:\n"
        "            os._exit(3)\n"
        "    os.read(r, 2)\n"
        "    os.kill(pid, signal.SIGTERM)\n"
        "    _, status = os.waitpid(pid, 0)\n"
        "    print(os.WTERMSIG(status) if os.WIFSIGNALED(status) else f'exit {os.WEXITSTATUS(status)}')\n"
        "run_stage(stage, 'forking')\n"
        "print('stage went on')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.split("\n")[:2] == [str(int(signal.SIGTERM)), "stage went on"], proc.stdout + proc.stderr


def test_a_temporary_of_a_dead_process_is_swept_at_any_stage_start(tmp_path):
    from hcd.atomic import sweep_dead_temps

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (tmp_path / "data/packed").mkdir(parents=True)
    stale = tmp_path / f"data/packed/.train_x.npy.tmp-{dead}-0a1b2c3d"
    stale.write_bytes(b"x" * 1000)
    mine = tmp_path / f"data/packed/.test_x.npy.tmp-{os.getpid()}-0a1b2c3d"
    mine.write_bytes(b"y")
    (tmp_path / ".hcd/journal").mkdir(parents=True)  # a journal being written when its stage was killed (seen by tests/test_faults.py)
    journal = tmp_path / f".hcd/journal/.{dead}-0a1b2c3d.json.tmp-{dead}-4e5f6a7b"
    journal.write_text('{"pid": ')
    assert sorted(sweep_dead_temps(tmp_path)) == sorted([stale, journal])
    assert not stale.exists() and not journal.exists() and mine.exists()


def test_an_error_names_the_output_not_its_hidden_temporary(capsys):
    import errno

    from hcd.cli import run_stage

    def fails(argv):
        raise OSError(errno.EROFS, "Read-only file system", "data/packed/.train_x.npy.tmp-4242-0a1b2c3d")

    with pytest.raises(SystemExit) as info:
        run_stage(fails, "scan")
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err == "hcd scan: error: data/packed/train_x.npy: Read-only file system"


# ----------------------------------------------------------------------------- 13: one runner per checkout


def _fake_engine(bin_dir: Path, name: str) -> Path:
    """An executable called ``dvc`` or ``snakemake`` that runs its arguments as a child, like an engine runs a stage."""
    exe = bin_dir / name
    exe.write_text(f"#!{sys.executable}\nimport subprocess, sys\nsys.exit(subprocess.call(sys.argv[1:]))\n")
    exe.chmod(0o755)
    return exe


def _checkout_with_a_stage(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """A folder for fake engines, a checkout, and a stage command that holds the checkout for argv[1] seconds."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ws = tmp_path / "ws"
    ws.mkdir()
    write_params(ws / "params.yaml", {"backbones": ["cnn"]})
    stage = [sys.executable, "-c", "import sys, time; from hcd.cli import run_stage; run_stage(lambda a: time.sleep(float(a[0])), 'check', sys.argv[1:])"]
    return bin_dir, ws, stage


def _wait_for_claim(ws: Path) -> dict:
    deadline = time.time() + 60
    while not (ws / ".hcd/runner.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    return json.loads((ws / ".hcd/runner.json").read_text())


def test_a_second_engine_in_one_checkout_is_refused_with_one_line(tmp_path):
    bin_dir, ws, stage = _checkout_with_a_stage(tmp_path)
    first = subprocess.Popen([str(_fake_engine(bin_dir, "snakemake")), *stage, "20"], cwd=ws, env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        held = _wait_for_claim(ws)
        assert held["kind"] == "snakemake" and held["pid"] == first.pid
        again = subprocess.run([str(bin_dir / "snakemake"), *stage, "0"], cwd=ws, env=ENV, capture_output=True, text=True)
        assert again.returncode == 2, "a second snakemake invocation is a second runner too"
        second = subprocess.run([str(_fake_engine(bin_dir, "dvc")), *stage, "0"], cwd=ws, env=ENV, capture_output=True, text=True)
        assert second.returncode == 2, second.stderr
        assert f"another run holds this checkout: snakemake (pid {first.pid}" in second.stderr and len(second.stderr.strip().splitlines()) == 1
    finally:
        first.kill()
        first.wait()
    after = subprocess.run([str(bin_dir / "dvc"), *stage, "0"], cwd=ws, env=ENV, capture_output=True, text=True)
    assert after.returncode == 0, "a killed runner's claim is taken over: nothing to clean up"
    assert json.loads((ws / ".hcd/runner.json").read_text())["kind"] == "dvc"


def test_the_jobs_of_a_cluster_workflow_share_the_checkout_but_block_dvc(tmp_path):
    """Under the SLURM executor each job runs under a Snakemake of its own (`--mode remote`): those share the checkout."""
    bin_dir, ws, stage = _checkout_with_a_stage(tmp_path)
    job = _fake_engine(bin_dir, "snakemake")
    remote = ["--mode", "remote"]  # on the engine's command line; the stage reads only its first word
    first = subprocess.Popen([str(job), *stage, "20", *remote], cwd=ws, env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        assert _wait_for_claim(ws)["kind"] == "snakemake-job"
        other_job = subprocess.run([str(job), *stage, "0", *remote], cwd=ws, env=ENV, capture_output=True, text=True)
        assert other_job.returncode == 0, other_job.stderr
        dvc = subprocess.run([str(_fake_engine(bin_dir, "dvc")), *stage, "0"], cwd=ws, env=ENV, capture_output=True, text=True)
        assert dvc.returncode == 2 and "another run holds this checkout: snakemake-job" in dvc.stderr, dvc.stderr
    finally:
        first.kill()
        first.wait()


def test_stages_of_one_runner_share_the_checkout(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    engine = bin_dir / "snakemake"
    engine.write_text(
        f"#!{sys.executable}\nimport subprocess, sys\n"
        "cmd = [sys.executable, '-c', \"import time; from hcd.cli import run_stage; run_stage(lambda a: time.sleep(2), 'check', [])\"]\n"
        "procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE) for _ in range(2)]\n"
        "sys.exit(max(p.wait() for p in procs))\n"
    )
    engine.chmod(0o755)
    proc = subprocess.run([str(engine)], cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_a_file_rewritten_with_its_mtime_kept_is_revealed_to_snakemake_by_ctime_and_content(tmp_path, monkeypatch):
    """Item 12: Snakemake trusts mtimes; hcd.pipeline.freshness finds the in-place edit (ctime moved, content
    differs, mtime as recorded) and sets its mtime to now. Copies, relinks and ordinary rewrites are left alone."""
    from hcd.pipeline import freshness
    from hcd.pipeline.freshness import reveal_hidden_edits

    hashed = []
    real_sha256 = freshness.file_sha256
    monkeypatch.setattr(freshness, "file_sha256", lambda p: hashed.append(p) or real_sha256(p))
    record = tmp_path / ".hcd/contents.json"
    arr = tmp_path / "train_x.npy"
    arr.write_bytes(b"\x00" * 4096)
    past = 1_700_000_000_000_000_000
    os.utime(arr, ns=(past, past))
    files = [str(arr), str(tmp_path / "missing.csv")]
    assert reveal_hidden_edits(files, record) == [] and hashed == [str(arr)]  # first sight: recorded
    assert reveal_hidden_edits(files, record) == [] and len(hashed) == 1  # unchanged: not hashed again
    with open(arr, "r+b") as f:  # one pixel changed in place...
        f.seek(2000)
        f.write(b"\x01")
    os.utime(arr, ns=(past, past))  # ...and the old mtime put back
    assert reveal_hidden_edits(files, record) == [str(arr)]
    assert arr.stat().st_mtime_ns > past
    assert reveal_hidden_edits(files, record) == []  # revealed once
    data = arr.read_bytes()
    arr.unlink()
    arr.write_bytes(data)  # same bytes, new inode and ctime (a dvc checkout): nothing to reveal
    assert reveal_hidden_edits(files, record) == []
    arr.write_bytes(b"\x02" * 4096)  # an ordinary rewrite: its new mtime speaks for itself
    mtime = arr.stat().st_mtime_ns
    assert reveal_hidden_edits(files, record) == [] and arr.stat().st_mtime_ns == mtime
