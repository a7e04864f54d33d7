"""Round 3 of the hostile-input corpus: what a shared bundle, a copied checkout or a careless file can do.

Each case is one thing a colleague's bundle, a planted or stale journal, a CSV from elsewhere or a slip
of the user's can hold, run through the code a user's command runs. Each must end with one line naming the
file and the problem (or, where a bad patch among good ones is normal, one row with its error) — never a
traceback, a hang, a file read from outside, a file touched outside the checkout, or a raw escape
sequence on the terminal. ``CASES`` in the closing note of the issue lists them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO

from hcd.data.tiff import encode_patch
from hcd.errors import HcdError
from hcd.tools.infer import infer

PY = [sys.executable, "-m", "hcd"]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HCD_THREADS": "1", "HCD_WORKERS": "1"}


def hcd(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*PY, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def one_line(proc: subprocess.CompletedProcess, *words: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-2000:]
    assert "\x1b" not in proc.stderr and len(lines[0]) < 400, lines[0][:400]
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def made(tiny_bundle, tmp_path_factory):
    """The tiny bundle (conftest), and a few patches to predict."""
    root = tmp_path_factory.mktemp("untrusted")
    shutil.copytree(tiny_bundle / "export", root / "export")
    x = np.load(tiny_bundle / "x.npy")
    (root / "patches").mkdir()
    for r in range(3):
        (root / "patches" / f"{r:040x}.tif").write_bytes(encode_patch(x[r]))
    return root


def copy_bundle(made: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(made / "export", tmp_path / "shared" / "export"))


def edit(bundle: Path, change) -> None:
    """Change the manifest (``change(manifest)``), keeping every hash true: only the change is wrong."""
    path = bundle / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))


def rehash(bundle: Path, rel: str) -> None:
    edit(bundle, lambda m: m["files"].__setitem__(rel, hashlib.sha256((bundle / rel).read_bytes()).hexdigest()))


def refused(made: Path, bundle: Path, tmp_path: Path, *words: str, runtime: str = "onnx") -> str:
    with pytest.raises(HcdError) as info:
        infer(bundle, [str(made / "patches")], tmp_path / "out.csv", runtime=runtime, progress=False, log=lambda m: None)
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 400 and not (tmp_path / "out.csv").exists(), msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


def external_data_model(bundle: Path, location: str) -> None:
    """The bundle's ONNX model with its first weight tensor moved to "external data" at ``location``."""
    import onnx

    path = bundle / "cnn/model.onnx"
    model = onnx.load(str(path))
    t = model.graph.initializer[0]
    t.ClearField("raw_data")
    del t.float_data[:]
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(4 * int(np.prod(t.dims))))):
        e = t.external_data.add()
        e.key, e.value = k, v
    path.write_bytes(model.SerializeToString())
    rehash(bundle, "cnn/model.onnx")


# ----------------------------------------------------------------------------- the bundle: one checked loader


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda m: m["files"].__setitem__("../secret.txt", "0" * 64), "is not a plain path inside the bundle"),
        (lambda m: m["files"].__setitem__("/etc/passwd", "0" * 64), "is not a plain path inside the bundle"),
        (lambda m: m["files"].pop("cnn/model.onnx"), "cnn/model.onnx is used but not listed"),
        (lambda m: m["files"].clear(), "files"),
        (lambda m: m["files"].__setitem__("cnn/model.onnx", "not-a-digest"), "is not a sha256"),
        (lambda m: m["backbones"][0]["models"][0].__setitem__("file", "cnn/../../x.onnx"), "is not cnn/model.onnx"),
        (lambda m: m["backbones"][0]["models"][0].__setitem__("std", [0.0, 0.2, 0.2]), "std"),
        (lambda m: m["backbones"][0]["models"][0].__setitem__("mean", [float("nan"), 0.5, 0.5]), "mean"),
        (lambda m: m["ensemble"].__setitem__("weights", [float("inf")]), "ensemble.weights"),
        (lambda m: m["ensemble"].__setitem__("weights", [1.0, 2.0]), "needs 1 weights"),
        (lambda m: m["ensemble"].pop("intercept"), "needs 1 weights and an intercept"),
        (lambda m: m["ensemble"].__setitem__("backbones", ["resnet18"]), "is not the bundle's backbones"),
        (lambda m: m["tta"].__setitem__("views", 3), "tta.views"),
        (lambda m: m.__setitem__("fold_average", "max"), "fold_average"),
        (lambda m: m["backbones"][0].update(crop=64, input_size=64), "disagree with"),
        (lambda m: m["backbones"][0].__setitem__("input_size", 96), "input_size"),
        (lambda m: m["backbones"][0]["models"][0].__setitem__("mean", [0.3, 0.3, 0.3]), "mean/std disagree with"),
        (lambda m: m["backbones"][0].__setitem__("name", "../cnn"), "is not a usable name"),
        (lambda m: m.__setitem__("backbones", []), "backbones"),
    ],
    ids=["parent-path", "absolute-path", "model-unlisted", "no-hashes", "bad-digest", "model-file-elsewhere", "zero-std", "nan-mean", "inf-weight",
         "weights-count", "no-intercept", "ensemble-backbones", "tta-3", "fold-average", "crop-disagrees", "input-size", "mean-disagrees", "name-traversal", "no-backbones"],
)
def test_a_manifest_that_lies_is_refused_before_any_model_is_opened(made, tmp_path, change, words):
    bundle = copy_bundle(made, tmp_path)
    edit(bundle, change)
    refused(made, bundle, tmp_path, str(bundle / "manifest.json"), words)


@pytest.mark.parametrize("runtime", ["onnx", "torch"])
def test_the_crop_the_torch_runtime_uses_is_the_checked_one(made, tmp_path, runtime):
    """model.json and the manifest must agree; a bundle whose model.json says another crop is refused for both runtimes."""
    bundle = copy_bundle(made, tmp_path)
    meta = json.loads((bundle / "cnn/model.json").read_text())
    meta["crop"] = 64
    (bundle / "cnn/model.json").write_text(json.dumps(meta))
    rehash(bundle, "cnn/model.json")
    refused(made, bundle, tmp_path, "disagree with", "model.json", runtime=runtime)


def test_onnx_external_data_cannot_turn_a_users_file_into_probabilities(made, tmp_path):
    """A model whose weights live "outside" it, at a path naming the user's credentials, is refused unread."""
    secret = tmp_path / "shared" / "kaggle.json"
    secret.parent.mkdir(parents=True)
    secret.write_bytes(b'{"username": "me", "key": "' + b"s" * 400 + b'"}')
    bundle = copy_bundle(made, tmp_path)
    external_data_model(bundle, "../kaggle.json")
    refused(made, bundle, tmp_path, "stored outside the model file", "external data")


def test_a_symlink_inside_the_bundle_is_refused_even_with_the_right_hash(made, tmp_path):
    bundle = copy_bundle(made, tmp_path)
    real = tmp_path / "elsewhere.onnx"
    shutil.move(bundle / "cnn/model.onnx", real)
    (bundle / "cnn/model.onnx").symlink_to(real)
    refused(made, bundle, tmp_path, "symbolic link inside the bundle")


def test_a_symlinked_folder_inside_the_bundle_is_refused(made, tmp_path):
    bundle = copy_bundle(made, tmp_path)
    shutil.move(bundle / "cnn", tmp_path / "cnn-elsewhere")
    (bundle / "cnn").symlink_to(tmp_path / "cnn-elsewhere")
    refused(made, bundle, tmp_path, "symbolic link inside the bundle")


@pytest.mark.parametrize("which", ["manifest.json", "cnn/model.onnx"])
def test_a_fifo_in_the_bundle_is_refused_without_hanging(made, tmp_path, which):
    bundle = copy_bundle(made, tmp_path)
    (bundle / which).unlink()
    os.mkfifo(bundle / which)
    done = threading.Event()
    msg: list[str] = []

    def run() -> None:
        try:
            infer(bundle, [str(made / "patches")], tmp_path / "out.csv", progress=False, log=lambda m: None)
        except HcdError as err:
            msg.append(str(err))
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(60), "hcd infer hung on a FIFO inside the bundle"
    assert msg and "not a regular file" in msg[0]


@pytest.mark.parametrize("text, words", [("{", "not valid JSON"), ("[" * 100000 + "]" * 100000, "not valid JSON"), ('{"format": 2}', "not an hcd bundle manifest"), ("[]", "not an hcd bundle manifest")])
def test_a_manifest_that_is_not_one_is_one_line(made, tmp_path, text, words):
    bundle = copy_bundle(made, tmp_path)
    (bundle / "manifest.json").write_text(text)
    refused(made, bundle, tmp_path, words)


def test_hcd_infer_on_a_hostile_bundle_is_one_line_on_the_command_line(made, tmp_path):
    bundle = copy_bundle(made, tmp_path)
    external_data_model(bundle, "../../../../../../etc/hostname")
    proc = hcd("infer", str(bundle), str(made / "patches"), "--out", str(tmp_path / "p.csv"))
    one_line(proc, "hcd infer: error:", "external data")


# ----------------------------------------------------------------------------- hcd infer's inputs


def test_a_fifo_named_like_a_patch_is_a_row_not_a_hang(made, tmp_path):
    folder = Path(shutil.copytree(made / "patches", tmp_path / "in"))
    os.mkfifo(folder / ("f" * 40 + ".tif"))
    proc = hcd("infer", str(made / "export"), str(folder), "--out", str(tmp_path / "p.csv"), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = pd.read_csv(tmp_path / "p.csv", dtype={"id": str}, keep_default_na=False).set_index("id")
    assert out.loc["f" * 40, "error"].startswith("undecodable: not a regular file") and (out["error"] == "").sum() == 3


def test_the_same_patch_given_twice_is_predicted_once_and_the_repeat_says_so(made, tmp_path):
    one = made / "patches" / f"{1:040x}.tif"
    out = infer(made / "export", [str(made / "patches"), str(one)], tmp_path / "p.csv", progress=False, log=lambda m: None)
    rows = out[out["id"] == f"{1:040x}"]
    assert len(rows) == 2 and rows["error"].tolist() == ["", "duplicate: this id was given earlier in the inputs; predicted once"]
    assert np.isfinite(rows["label"].iloc[0]) and np.isnan(rows["label"].iloc[1])


def _damaged_zip(path: Path, good: bytes, kind: str) -> Path:
    name = f"test/{'b' * 40}.tif"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"test/{'a' * 40}.tif", good)
        zf.writestr(name, good)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(name)
    at = info.header_offset
    if kind == "crc":
        start = at + 30 + len(name)
        data[start + 100] ^= 0xFF  # the member's bytes change, its recorded CRC does not
    elif kind == "encrypted":
        data[at + 6] |= 0x1  # the local header's flag bit; the central directory's below
        cd = data.rfind(b"PK\x01\x02")
        data[cd + 8] |= 0x1
    elif kind == "method":
        data[at + 8] = 99  # an unknown compression method, in both headers
        cd = data.rfind(b"PK\x01\x02")
        data[cd + 10] = 99
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("kind", ["crc", "encrypted", "method"])
def test_a_damaged_zip_member_is_a_row_not_a_traceback(made, tmp_path, kind):
    good = (made / "patches" / f"{0:040x}.tif").read_bytes()
    arc = _damaged_zip(tmp_path / "in.zip", good, kind)
    proc = hcd("infer", str(made / "export"), str(arc), "--out", str(tmp_path / "p.csv"))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    out = pd.read_csv(tmp_path / "p.csv", dtype={"id": str}, keep_default_na=False).set_index("id")
    assert out.loc["a" * 40, "error"] == "" and out.loc["b" * 40, "error"].startswith("undecodable: zip member cannot be read")


# ----------------------------------------------------------------------------- CSVs from elsewhere: one reader, one formatter


@pytest.fixture
def scored(tmp_path):
    (tmp_path / "labels.csv").write_text("id,label\n" + "".join(f"{i:040x},{i % 2}\n" for i in range(6)))
    (tmp_path / "index.csv").write_text("row,id\n" + "".join(f"{i},{i:040x}\n" for i in range(6)))
    return tmp_path


@pytest.mark.parametrize(
    "content, words",
    [
        (b"id,label\n" + b"\xff\xfe\x00bad\n", "not UTF-8 text"),
        (b"", "empty file"),
        (b"   \n\n", "empty file"),
        (b"id,label\n" + b"a" * 10_000_000 + b",0.5\n", "line 2 is longer than 1024 characters"),
        (b"PK\x03\x04junk", "a zip archive, not a CSV"),
        (b"name,prob\nx,0.1\n", "no 'id' column"),
    ],
    ids=["not-utf8", "empty", "blank", "ten-mb-id", "zip", "no-id"],
)
@pytest.mark.parametrize("command", ["submit", "score"])
def test_a_csv_that_is_not_a_submission_is_one_line_in_every_command(scored, content, words, command):
    (scored / "sub.csv").write_bytes(content)
    if command == "submit":
        proc = hcd("submit", "--dry-run", "--file", str(scored / "sub.csv"), "--test-index", str(scored / "index.csv"), "--params", str(REPO / "params.yaml"))
    else:
        proc = hcd("score", str(scored / "sub.csv"), str(scored / "labels.csv"))
    one_line(proc, f"hcd {command}: error:", str(scored / "sub.csv"), words)


@pytest.mark.parametrize("command", ["submit", "score"])
def test_an_id_holding_terminal_escapes_reaches_the_terminal_escaped(scored, command):
    evil = "\x1b]0;pwned\x07\x1b[2J" + "z" * 900
    (scored / "sub.csv").write_text("id,label\n" + "".join(f"{i:040x},0.5\n" for i in range(6)) + f"{evil},0.5\n")
    if command == "submit":
        proc = hcd("submit", "--dry-run", "--file", str(scored / "sub.csv"), "--test-index", str(scored / "index.csv"), "--params", str(REPO / "params.yaml"))
        one_line(proc, "ids not in sample_submission", "\\x1b")
    else:
        (scored / "labels.csv").write_text("id,label\n" + "".join(f"{i:040x},{i % 2}\n" for i in range(5)) + f"{evil},1\n")
        (scored / "sub.csv").write_text("id,label\n" + "".join(f"{i:040x},0.5\n" for i in range(5)) + f"{evil},oops\n")
        one_line(proc := hcd("score", str(scored / "sub.csv"), str(scored / "labels.csv")), "is not a finite number", "\\x1b")
        assert "z" * 100 not in proc.stderr


def test_a_fifo_given_as_a_csv_is_refused_unread(scored):
    os.mkfifo(scored / "sub.csv")
    one_line(hcd("score", str(scored / "sub.csv"), str(scored / "labels.csv"), timeout=60), "not a regular file")


@pytest.mark.parametrize("n", ["-1", "10000000"])
def test_a_bootstrap_count_out_of_range_is_one_line(scored, n):
    (scored / "sub.csv").write_text("id,label\n" + "".join(f"{i:040x},{i / 10}\n" for i in range(6)))
    one_line(hcd("score", str(scored / "sub.csv"), str(scored / "labels.csv"), "--bootstrap", n), "--bootstrap", n)


# ----------------------------------------------------------------------------- files a user points params at


@pytest.mark.parametrize("content", ["tensor", "list", "nested"])
def test_a_pretrained_file_that_holds_no_weights_mapping_is_one_line(tmp_path, content):
    import torch

    from hcd.model.factory import build_model

    obj = {"tensor": torch.zeros(3), "list": [torch.zeros(3)], "nested": {"state_dict": {"w": [1, 2]}}}[content]
    torch.save(obj, tmp_path / "w.pt")
    with pytest.raises(HcdError, match="not weights") as info:
        build_model("cnn", pretrained=str(tmp_path / "w.pt"))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("overlay", ["backbones: [[cnn]]\n", "backbones: [cnn, {a: 1}]\n", "train: {augment: [1, 2]}\n"])
@pytest.mark.parametrize("action", ["apply", "flags"])
def test_an_overlay_with_a_structure_where_a_value_should_be_is_one_line(tmp_path, overlay, action):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "o.yaml").write_text(overlay)
    one_line(hcd("params", action, "o.yaml", cwd=tmp_path), "hcd params: error: o.yaml:")
    assert (tmp_path / "params.yaml").read_bytes() == (REPO / "params.yaml").read_bytes()


def test_params_flags_output_is_quoted_for_a_shell_and_runs_nothing_when_pasted(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    marker = tmp_path / "pwned"
    (tmp_path / "o.yaml").write_text(f"data: {{path: \"x;touch${{IFS}}{marker};#\"}}\nlr: 0.001\n")
    proc = hcd("params", "flags", "o.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    words = shlex.split(proc.stdout)
    assert words == ["-S", f"++data.path=x;touch${{IFS}}{marker};#", "-S", "++lr=0.001"]
    subprocess.run(["bash", "-c", "flags=$(cat) && eval \"printf '%s\\n' $flags\""], input=proc.stdout, cwd=tmp_path, capture_output=True, text=True, check=True)
    assert not marker.exists()


@pytest.mark.parametrize("held", ["[]", '{"pid": "x"}', '{"pid": 1, "started": "yesterday", "host": "h", "kind": "dvc"}', '{"pid": true, "started": 1, "host": 2, "kind": []}', "\x00\x01"])
def test_a_malformed_runner_claim_is_taken_over_not_a_traceback_in_every_stage(tmp_path, held):
    (tmp_path / ".hcd").mkdir()
    (tmp_path / ".hcd/runner.json").write_text(held)
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    proc = hcd("check", "params.yaml", "--out", "data/check/params.json", cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert json.loads((tmp_path / ".hcd/runner.json").read_text())["kind"] == "hcd"


def test_report_on_a_model_json_without_its_history_is_one_line(tmp_path):
    from hcd.stages.report import _with_history

    meta = {"backbone": "cnn", "crop": 48, "upscale": None, "mean": [0.5] * 3, "std": [0.2] * 3, "best_epoch": 1}
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(HcdError, match=r"model.json: history: missing") as info:
        _with_history(tmp_path / "model.json")
    assert "\n" not in str(info.value)
    (tmp_path / "model.json").write_text(json.dumps({**meta, "history": [{"epoch": 1, "train_loss": "x"}]}))
    with pytest.raises(HcdError, match="not a list of epochs"):
        _with_history(tmp_path / "model.json")


@pytest.mark.parametrize(
    "url, shown",
    [
        ("https://me:hunter2@host/store?X-Amz-Signature=abc123&X-Amz-Credential=k", "https://me@host/store?…"),
        ("azure://box/hcd?sv=2024-01-01&sig=SECRETSIG", "azure://box/hcd?…"),
        ("s3://bucket/hcd#frag-token", "s3://bucket/hcd?…"),
        ("/mnt/shared/dvc\x1b[2J", "/mnt/shared/dvc?[2J"),
    ],
)
def test_a_remote_urls_password_and_query_token_are_never_printed(url, shown):
    from hcd.tools.remote import _address

    assert _address(url) == shown


# ----------------------------------------------------------------------------- the commit journal


def _journal(root: Path, renames: list[dict], pid: int = 2**22 + 12345, **extra) -> Path:
    """A journal as a dead process would leave it (pid far above any live one)."""
    from hcd.atomic import JOURNAL_VERSION, _identity

    (root / ".hcd/journal").mkdir(parents=True, exist_ok=True)
    path = root / f".hcd/journal/{pid}-0a1b2c3d.json"
    path.write_text(json.dumps({"version": JOURNAL_VERSION, "pid": pid, "checkout": _identity(root), "renames": renames, **extra}))
    return path


def _checkout(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "checkout"
    (root / "results").mkdir(parents=True)
    victim = tmp_path / "outside.txt"
    victim.write_text("the user's file")
    return root, victim


@pytest.mark.parametrize(
    "entry",
    [
        lambda root, victim: {"tmp": str(victim), "dest": str(root / "results/x.csv"), "dir": False},
        lambda root, victim: {"tmp": "results/.x.csv.tmp-1-0a1b2c3d", "dest": str(victim), "dir": False},
        lambda root, victim: {"tmp": "../outside.txt", "dest": "results/x.csv", "dir": False},
        lambda root, victim: {"tmp": "results/.x.csv.tmp-1-0a1b2c3d", "dest": "../outside.txt", "dir": False},
        lambda root, victim: {"tmp": "results/params.yaml", "dest": "results/x.csv", "dir": False},
        lambda root, victim: {"tmp": "results/.x.csv.tmp-1-0a1b2c3d", "dest": "results/y.csv", "dir": False},
        lambda root, victim: {"tmp": "results/.x.csv.tmp-1-0a1b2c3d", "dest": "results/x.csv", "dir": "yes"},
        lambda root, victim: {"tmp": "link/.outside.txt.tmp-1-0a1b2c3d", "dest": "link/outside.txt", "dir": False},
    ],
    ids=["absolute-source", "absolute-destination", "parent-source", "parent-destination", "not-a-temporary", "another-name", "bad-type", "through-a-link"],
)
def test_a_planted_or_stale_journal_never_renames_outside_its_checkout(tmp_path, entry):
    from hcd.atomic import replay_journals

    root, victim = _checkout(tmp_path)
    (root / "link").symlink_to(tmp_path)
    (root / "results/.x.csv.tmp-1-0a1b2c3d").write_text("planted")
    (tmp_path / ".outside.txt.tmp-1-0a1b2c3d").write_text("planted")
    (root / "results/params.yaml").write_text("mine")
    journal = _journal(root, [entry(root, victim)])
    assert replay_journals(root / ".hcd/journal") == []
    assert victim.read_text() == "the user's file" and not (root / "results/x.csv").exists() and not (root / "results/y.csv").exists()
    assert (root / "results/params.yaml").read_text() == "mine" and not journal.exists()


def test_an_old_format_journal_with_absolute_paths_is_dropped_unreplayed(tmp_path):
    from hcd.atomic import replay_journals

    root, victim = _checkout(tmp_path)
    (root / ".hcd/journal").mkdir(parents=True)
    (root / ".hcd/journal/99999999-0a1b2c3d.json").write_text(json.dumps({"pid": 99999999, "renames": [{"tmp": str(victim), "dest": str(root / "x"), "dir": False}]}))
    assert replay_journals(root / ".hcd/journal") == [] and victim.exists() and not (root / "x").exists()


def test_a_journal_copied_with_its_checkout_replays_in_neither_the_copy_nor_through_it_into_the_original(tmp_path):
    """``cp -a`` while a commit was pending: the copy's stage start drops the copy's journal and touches nothing of
    the original; the original finishes its own renames at its own next start."""
    from hcd.atomic import replay_journals

    root, _ = _checkout(tmp_path)
    (root / "results/x.csv").write_text("old")
    (root / "results/.x.csv.tmp-1-0a1b2c3d").write_text("new")
    _journal(root, [{"tmp": "results/.x.csv.tmp-1-0a1b2c3d", "dest": "results/x.csv", "dir": False}])
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(root), str(copy)], check=True)
    assert replay_journals(copy / ".hcd/journal") == []
    assert (copy / "results/x.csv").read_text() == "old" and (root / "results/x.csv").read_text() == "old"
    assert not list((copy / ".hcd/journal").glob("*.json"))
    assert len(replay_journals(root / ".hcd/journal")) == 1 and (root / "results/x.csv").read_text() == "new"


def test_a_commit_journals_paths_relative_to_its_checkout_with_its_identity(tmp_path, monkeypatch):
    import hcd.atomic as atomic

    monkeypatch.chdir(tmp_path)
    seen: list[dict] = []
    real = atomic._apply

    def spy(items):
        seen.extend(json.loads(p.read_text()) for p in Path(".hcd/journal").glob("*.json"))
        real(items)

    monkeypatch.setattr(atomic, "_apply", spy)
    with atomic.Commit() as c:
        c.json("results/a.json", {"v": 1})
        c.json("metrics/b.json", {"v": 2})
    (j,) = seen
    assert j["version"] == atomic.JOURNAL_VERSION and j["checkout"] == atomic._identity(tmp_path)
    assert [e["dest"] for e in j["renames"]] == ["results/a.json", "metrics/b.json"]
    assert all(not Path(e["tmp"]).is_absolute() and e["tmp"].startswith(("results/.a.json.tmp-", "metrics/.b.json.tmp-")) for e in j["renames"])
    assert json.loads(Path("results/a.json").read_text()) == {"v": 1} and not list(Path(".hcd/journal").glob("*.json"))
