"""The whole pipeline through `dvc repro` and `snakemake` in temporary copies of the repo.

On a tiny demo config (two backbones, two epochs) both engines must produce
byte-identical outputs on the CPU — packed arrays, weights, predictions, metrics,
submission — rerun exactly the stages a params change affects, and Snakemake must
not rerun anything after DVC has rewritten every file with new modification times.
Snakemake trains the two backbones at the same time (one thread each for the
scheduler, HCD_THREADS=2 for torch) and must still match DVC's one-at-a-time run.

Every run has a fake Kaggle key in the environment and in KAGGLE_CONFIG_DIR; the
last test greps everything the runs wrote and printed for it. Both engines are
also killed with SIGKILL mid-training and rerun: the results equal the baseline.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO

pytestmark = pytest.mark.e2e

TINY = {
    "backbones": ["cnn", "resnet10t"],
    "data": {"demo": {"n_train": 240, "n_test": 30, "n_slides": 12}},
    "train": {"epochs": 2, "batch_size": 32, "crop": 48, "patience": 0},
    "predict": {"tta": 2, "batch_size": 64},
    "metrics": {"bootstrap": 20},
}
SECRET = secrets.token_hex(16)  # a fake Kaggle key, made per session (so not in any copied file): it must appear in nothing a run writes or prints
KAGGLE_DIR = Path(tempfile.mkdtemp(prefix="hcd-kaggle-"))
(KAGGLE_DIR / "kaggle.json").write_text(json.dumps({"username": "hcd-test", "key": SECRET}))
os.chmod(KAGGLE_DIR / "kaggle.json", 0o600)
ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "HCD_WORKERS": "2", "HCD_THREADS": "2", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
ENV |= {"KAGGLE_CONFIG_DIR": str(KAGGLE_DIR), "KAGGLE_USERNAME": "hcd-test", "KAGGLE_KEY": SECRET}
ENV |= {"HCD_GPUS": "0,1", "HCD_GPU_LOCK_DIR": tempfile.mkdtemp(prefix="hcd-gpus-")}  # two fake GPU slots: concurrent jobs must take distinct ones
SNAKE_PARALLEL = ("--cores", "2", "--set-threads", "train=1", "predict=1", "--resources", "gpu=2")  # both backbones train at once
LOGS: list[str] = []  # everything the engines printed, for the credentials test
MODEL_STAGES = {"train@cnn", "train@resnet10t", "predict@cnn", "predict@resnet10t", "explain@cnn", "explain@resnet10t", "ensemble", "metrics", "report", "export"}
ALL_STAGES = {"check", "download", "scan", "split", "stats"} | MODEL_STAGES  # check reruns (cheaply) on any params.yaml edit


RUN_TIMEOUT = 1200  # seconds for one engine command (the longest, both engines on three folds, takes about 200)


def sh(cwd: Path, *cmd: str, ok: bool = True) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=RUN_TIMEOUT)  # a hang fails, not the CI's clock
    LOGS.append(proc.stdout + proc.stderr)
    assert proc.returncode == 0 or not ok, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def side_by_side(*runs: tuple[Path, tuple[str, ...]]) -> list[str]:
    """Each (root, command) at the same time, in its own GPU-slot lock folder (the runs share no slots), like
    ``sh``: two engines overlap the one-thread parts of their stages (process starts, imports, hashing)."""
    procs = [subprocess.Popen(cmd, cwd=root, env=ENV | {"HCD_GPU_LOCK_DIR": tempfile.mkdtemp(prefix="hcd-gpus-")}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for root, cmd in runs]
    logs = [proc.communicate(timeout=RUN_TIMEOUT)[0] for proc in procs]
    LOGS.extend(logs)
    for (_, cmd), proc, log in zip(runs, procs, logs):
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{log[-3000:]}"
    return logs


def repo_copy(dest: Path, **changes) -> Path:
    """The working tree as git sees it (tracked + untracked-not-ignored), as a fresh git repo."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    set_params(dest, **TINY)
    set_params(dest, **changes)
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
    """Every file the pipeline wrote (outputs of every stage, per-backbone ones expanded), byte for byte:
    the export manifest too (it records code by git blob id, the same in every copy, not a commit)."""
    files = [p for d in ("data", "models", "predictions", "results", "metrics", "plots", "dvclive", "export", "explain", "report") for p in (root / d).rglob("*") if p.is_file() and p.name != ".gitignore"]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if "groups" not in p.parts and p.name != ".snakemake_timestamp"}


def dvc_ran(log: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w@.-]+)'", log))


def snakemake_would_run(root: Path) -> set[str]:
    out = sh(root, "snakemake", "--dry-run", "--cores", "2")
    jobs = set()
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", out):
        m = re.match(r"(?:local)?rule (\w+):", block)
        if m and m.group(1) != "all":
            wild = re.search(r"^\s+wildcards: backbone=(\S+)", block, re.M)
            jobs.add(m.group(1) + (f"@{wild.group(1)}" if wild else ""))
    return jobs


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    dvc_root = repo_copy(tmp_path_factory.mktemp("dvc"))
    snake_root = repo_copy(tmp_path_factory.mktemp("snakemake"))
    dvc_log, snake_log = side_by_side((dvc_root, ("dvc", "repro")), (snake_root, ("snakemake", *SNAKE_PARALLEL)))
    sh(dvc_root, "git", "add", "-A")
    sh(dvc_root, "git", "commit", "-qm", "baseline results")  # dvc.lock and metrics, for `dvc metrics diff`
    BASELINE.update(digests(dvc_root))
    return dvc_root, snake_root, dvc_log, snake_log


BASELINE: dict[str, str] = {}  # the outputs of the first, uninterrupted dvc run


def test_both_engines_run_every_stage_and_agree_byte_for_byte(engines):
    dvc_root, snake_root, dvc_log, _ = engines
    assert dvc_ran(dvc_log) == ALL_STAGES
    got = digests(dvc_root)
    assert got == digests(snake_root)
    for must in ("results/submission.csv", "models/cnn/model.safetensors", "predictions/resnet10t/test.csv", "metrics/metrics.json", "plots/roc.json", "dvclive/cnn/metrics.json", "report/roc.png", "explain/cnn/grids/most_wrong.png", "export/manifest.json", "export/resnet10t/model.onnx"):
        assert must in got, must


def infer_matches_submission(root: Path) -> None:
    """`hcd infer` on the raw archive's test patches (Kaggle layout) from the export bundle = results/submission.csv."""
    import pandas as pd

    sh(root, "hcd", "infer", "export", "data/raw/hcd.zip", "--out", "infer.csv")
    got = pd.read_csv(root / "infer.csv", dtype={"id": str}, keep_default_na=False)
    sub = pd.read_csv(root / "results/submission.csv", dtype={"id": str})
    ok = got[got["error"] == ""].merge(sub, on="id", suffixes=("_infer", ""))
    flagged = pd.read_csv(root / "data/scan/report.csv", dtype={"id": str})
    assert len(ok) == len(sub) - int(((flagged["split"] == "test") & flagged["reason"].isin(["undecodable", "wrong_format"])).sum()) and len(ok) > 20
    assert (ok["label_infer"].astype(float) - ok["label"]).abs().max() <= 1e-4
    (root / "infer.csv").unlink()


def test_hcd_infer_reproduces_the_submission_from_the_bundle(engines):
    infer_matches_submission(engines[0])


def test_a_second_run_does_nothing(engines):
    dvc_root, snake_root, _, _ = engines
    assert dvc_ran(sh(dvc_root, "dvc", "repro")) == set()
    assert snakemake_would_run(snake_root) == set()


def _clone_and_pull(dvc_root: Path, dest: Path, remote_args: list[str]) -> Path:
    """A fresh clone of the run's git history, with the remote as its default, then `hcd pull`."""
    sh(dest.parent, "git", "clone", "-q", str(dvc_root), str(dest))
    sh(dest, "dvc", "remote", "add", "--local", "-d", "store", *remote_args[:1])
    for key, value in zip(remote_args[1::2], remote_args[2::2]):
        sh(dest, "dvc", "remote", "modify", "--local", "store", key, value)
    sh(dest, "hcd", "pull")
    return dest


def test_a_fresh_clone_pulls_the_run_from_a_remote_and_neither_engine_reruns_anything(engines, tmp_path):
    """dvc push to a local-path remote and to an SSH remote (a real sshd on localhost, a key made for the test);
    a fresh clone + hcd pull has every output of the run, and dvc repro and snakemake rerun nothing."""
    dvc_root = engines[0]
    import getpass
    import socket

    remotes = {"local": [str(tmp_path / "remote")]}
    with socket.socket() as s:  # a free port for this test's own sshd
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sshd_env = ENV | {"HCD_SSHD_DIR": str(tmp_path / "sshd"), "HCD_SSHD_PORT": str(port)}
    sshd = subprocess.run(["bash", str(REPO / "tests/cluster/sshd.sh"), "start"], capture_output=True, text=True, env=sshd_env)
    if sshd.returncode == 0:
        remotes["ssh"] = [f"ssh://{getpass.getuser()}@127.0.0.1:{port}{tmp_path}/ssh-remote", "keyfile", str(tmp_path / "sshd/id_ed25519")]
    for kind, args in remotes.items():
        sh(dvc_root, "dvc", "remote", "add", "--local", "-f", kind, args[0])
        for key, value in zip(args[1::2], args[2::2]):
            sh(dvc_root, "dvc", "remote", "modify", "--local", kind, key, value)
        assert f"hcd push: to {kind}" in sh(dvc_root, "hcd", "push", "-r", kind)
        clone = _clone_and_pull(dvc_root, tmp_path / f"clone-{kind}", args)
        assert digests(clone) == BASELINE, kind
        assert dvc_ran(sh(clone, "dvc", "repro")) == set(), kind
        assert snakemake_would_run(clone) == set(), kind
    subprocess.run(["bash", str(REPO / "tests/cluster/sshd.sh"), "stop"], capture_output=True, env=sshd_env)

    before = digests(clone)
    sh(clone, "dvc", "remote", "add", "--local", "dead", "ssh://nobody@127.0.0.1:1/nowhere")
    out = sh(clone, "hcd", "pull", "-r", "dead", ok=False)
    assert re.fullmatch(r"hcd pull: error: remote 'dead' \(ssh://nobody@127\.0\.0\.1:1/nowhere\): cannot connect: .*(refused|failed).*\n", out), out
    assert digests(clone) == before, "a failed pull changed local files"
    if "ssh" not in remotes:
        pytest.skip(f"the local-path remote passed; no SSH server could be started here: {(sshd.stderr.strip().splitlines() or ['?'])[-1]}")


def test_exp_run_lr_reruns_only_the_model_stages_and_metrics_diff_shows_it(engines):
    dvc_root, _, _, _ = engines
    before = json.loads((dvc_root / "metrics/metrics.json").read_text())
    log = sh(dvc_root, "dvc", "exp", "run", "-S", "lr=0.0005")
    assert dvc_ran(log) == MODEL_STAGES | {"check"}
    after = json.loads((dvc_root / "metrics/metrics.json").read_text())
    assert after["cnn"]["auc"] != before["cnn"]["auc"]
    diff = sh(dvc_root, "dvc", "metrics", "diff")
    assert "metrics/summary.json" in diff and "cnn.auc" in diff
    assert "lr" in sh(dvc_root, "dvc", "params", "diff")
    ALONE.update(lock_outs(dvc_root))  # lr=0.0005 run alone: the queued run of the same value must equal it


ALONE: dict[str, str] = {}  # cached output -> md5 of the lr=0.0005 experiment run by itself


def lock_outs(root: Path) -> dict[str, str]:
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    ours = tuple(f"{d}/{b}/" for d in ("models", "predictions") for b in TINY["backbones"])  # a lock may keep entries of backbones no longer listed
    return {o["path"]: o.get("md5", "") for st in lock["stages"].values() for o in st.get("outs", []) if o["path"].startswith(ours)}


@pytest.mark.skipif(not os.environ.get("HCD_QUEUE_TEST"), reason="long variant (three more trainings of both backbones): HCD_QUEUE_TEST=1")
def test_three_queued_experiments_on_two_workers_each_equal_a_run_alone(engines):
    """dvc exp run --queue x3, dvc queue start -j 2: all finish, exp show lists each with its AUC, and the one
    whose lr was also run alone (the test above) has bit-identical models and predictions."""
    dvc_root, _, _, _ = engines
    assert ALONE
    sh(dvc_root, "git", "checkout", "--", ".")  # queue from the baseline commit, not from the applied lr=0.0005 run (it would be all cached)
    sh(dvc_root, "dvc", "checkout", "--quiet")
    for lr in ("0.0005", "0.001", "0.002"):
        sh(dvc_root, "dvc", "exp", "run", "--queue", "-S", f"lr={lr}", "--name", f"q-lr{lr}")
    sh(dvc_root, "dvc", "queue", "start", "-j", "2")
    deadline = time.time() + 1200
    while time.time() < deadline:
        status = sh(dvc_root, "dvc", "queue", "status")
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(3)
    assert status.count("Success") == 3, status
    shown = json.loads(subprocess.run(["dvc", "exp", "show", "--json"], cwd=dvc_root, env=ENV, capture_output=True, text=True, check=True).stdout)
    runs = {e["name"]: e["data"] for rev in shown for group in (rev.get("experiments") or []) for e in group["revs"] if (e.get("name") or "").startswith("q-lr")}
    assert set(runs) == {"q-lr0.0005", "q-lr0.001", "q-lr0.002"}, sorted(runs)
    aucs = {name: data["metrics"]["metrics/summary.json"]["data"]["ensemble"]["auc"] for name, data in runs.items()}
    assert all(0 <= a <= 1 for a in aucs.values()) and len(set(aucs.values())) > 1, aucs
    queued = {path: out["hash"] for path, out in runs["q-lr0.0005"]["outs"].items() if path.startswith(("models/", "predictions/"))}
    assert queued == ALONE, "the queued lr=0.0005 run differs from the same experiment run alone"
    assert all(queued[p] != h for p, h in lock_outs(dvc_root).items() if p.startswith("models/")), "the queue reran nothing"


def test_one_backbones_override_plans_only_that_backbones_training(engines):
    """``models.resnet10t.lr`` is read by train@resnet10t alone: DVC finds only that training out of date (with
    the params check, and export, whose manifest records every params key that made the models), Snakemake plans
    only what follows from it; cnn's model is not retrained by either."""
    dvc_root, snake_root, _, _ = engines
    kept = {root: (root / "params.yaml").read_text() for root in (dvc_root, snake_root)}
    try:
        for root in (dvc_root, snake_root):
            set_params(root, models={"resnet10t": {"lr": 0.0007}})
        status = json.loads(sh(dvc_root, "dvc", "status", "--json"))
        assert set(status) == {"check", "train@resnet10t", "export"}, status
        assert snakemake_would_run(snake_root) == {"check", "train@resnet10t", "predict@resnet10t", "explain@resnet10t", "ensemble", "metrics", "report", "export"}
    finally:
        for root, text in kept.items():
            (root / "params.yaml").write_text(text)
    assert snakemake_would_run(snake_root) == set()


def test_a_predict_param_reruns_predict_ensemble_metrics_only(engines):
    """DVC finds exactly the stages that read ``predict`` out of date (and export, which records it; what follows
    a changed output reruns after it, as the lr experiment above shows with a real run, the unchanged params
    check included); Snakemake plans those and what follows them. The two engines' outputs after a params
    change are compared by the folds test."""
    dvc_root, snake_root, _, _ = engines
    sh(dvc_root, "git", "checkout", "--", ".")  # back to the baseline commit: undo the lr the experiment applied...
    sh(dvc_root, "dvc", "checkout", "--quiet")  # ...and its outputs
    for root in (dvc_root, snake_root):
        set_params(root, predict={"tta": 4})
    assert snakemake_would_run(snake_root) == {"check", "predict@cnn", "predict@resnet10t", "explain@cnn", "explain@resnet10t", "ensemble", "metrics", "report", "export"}
    assert set(json.loads(sh(dvc_root, "dvc", "status", "--json"))) == {"check", "predict@cnn", "predict@resnet10t", "export"}
    for root in (dvc_root, snake_root):  # both engines on the same params again (the folds test compares them)
        set_params(root, predict={"tta": TINY["predict"]["tta"]})
    assert snakemake_would_run(snake_root) == set()  # Snakemake's outputs were made with these


def test_snakemake_survives_dvc_rewriting_every_file(engines):
    _, snake_root, _, _ = engines
    # DVC takes Snakemake's outputs into its cache and checks every one out again, as after a
    # `git checkout` of another revision and back: every file is rewritten with a new mtime
    sh(snake_root, "dvc", "commit", "--force", "--quiet")
    sh(snake_root, "dvc", "checkout", "--force", "--relink", "--quiet")
    for path in sorted((snake_root / "data").rglob("*"), reverse=True):  # inputs end up newer than outputs
        if path.is_file():
            os.utime(path)
    assert snakemake_would_run(snake_root) == set()


def test_snakemake_sees_a_packed_array_edited_in_place_with_its_mtime_kept(engines):
    """One byte of data/packed/train_x.npy changed, its old mtime put back: every stage that read it
    (and what follows) reruns; the byte restored the same way, nothing does."""
    _, snake_root, _, _ = engines
    arr = snake_root / "data/packed/train_x.npy"
    before = arr.stat()

    def poke(byte: bytes) -> bytes:
        with open(arr, "r+b") as f:
            f.seek(before.st_size - 1)
            old = f.read(1)
            f.seek(before.st_size - 1)
            f.write(byte)
        os.utime(arr, ns=(before.st_atime_ns, before.st_mtime_ns))
        return old

    original = poke(b"\x07" if arr.read_bytes()[-1:] != b"\x07" else b"\x08")
    out = sh(snake_root, "snakemake", "--dry-run", "--cores", "2")
    assert "data/packed/train_x.npy: content changed with its mtime kept" in out
    assert snakemake_would_run(snake_root) == MODEL_STAGES | {"stats"}
    poke(original)
    assert snakemake_would_run(snake_root) == set()


def test_dvc_metrics_and_plots_read_the_outputs(engines, tmp_path):
    dvc_root, _, _, _ = engines
    out = sh(dvc_root, "dvc", "metrics", "show")
    assert "metrics/summary.json" in out and "ensemble.auc" in out and "cnn.auc_ci95_low" in out
    assert "dvclive/cnn/metrics.json" in out and "best/epoch" in out
    assert "metrics/scan.json" not in out and "metrics/metrics.json" not in out, "only what a user compares is a DVC metric"
    assert len(out.splitlines()[0].split()) <= 20, "a few columns, not a hundred"
    narrow = sh(dvc_root, "dvc", "exp", "show", "--no-pager", "--drop", ".*", "--keep", "Experiment|lr$|[^.:/]*\\.auc$")  # the README's line
    assert "cnn.auc" in narrow and "ensemble.auc" in narrow and max(len(line) for line in narrow.splitlines()) <= 80
    plots = json.loads(sh(dvc_root, "dvc", "plots", "show", "--json"))["data"]
    for name in ("plots/roc.json", "plots/confusion.json", "report/training.png", "explain/cnn/grids/random.png"):
        assert name in plots, name
    for b in TINY["backbones"]:  # each curve its own chart, titled with the backbone and what it shows, against the epoch
        for what in ("training loss", "validation loss", "validation AUC"):
            (chart,) = plots[f"{b} — {what}"]
            assert chart["content"]["encoding"]["x"]["title"] == "epoch" and chart["content"]["title"]["text"] == f"{b} — {what}"
            assert min(int(r["step"]) for r in chart["content"]["data"]["values"]) == 1


def test_snakemake_trained_both_backbones_at_once_and_matched_dvc(engines):
    _, _, _, snake_log = engines
    started = [m.start() for m in re.finditer(r"^(?:local)?rule train:", snake_log, re.M)]
    finished = re.search(r"^Finished jobid: \d+ \(Rule: train\)", snake_log, re.M)
    assert len(started) == 2 and finished, snake_log[-3000:]
    assert started[1] < finished.start(), "the second training started only after the first had finished"
    slots = re.findall(r"^hcd train: GPU slot (\S+) of 0,1 ", snake_log, re.M)
    assert sorted(slots) == ["0", "1"], f"two trainings at once must hold distinct GPU slots, got {slots}"
    # outputs equal DVC's sequential run: test_both_engines_run_every_stage_and_agree_byte_for_byte


def _kill_mid_training(root: Path, *cmd: str) -> None:
    """Start an engine, SIGKILL its whole process group shortly after a training checkpoint appears."""
    proc = subprocess.Popen(cmd, cwd=root, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline and not list(root.glob("models/*/checkpoint.pt")):
        time.sleep(0.05)
    time.sleep(random.Random(str(cmd)).uniform(0.0, 0.5))  # somewhere in the second epoch
    if proc.poll() is not None:
        raise AssertionError(f"the run ended before it could be killed:\n{proc.communicate()[0][-3000:]}")
    os.killpg(proc.pid, signal.SIGKILL)
    LOGS.append(proc.communicate()[0])
    assert not (root / "results/submission.csv").exists()


def _same_as_baseline(root: Path) -> None:
    """What a run up to train@cnn made equals the uninterrupted full run's files of the same names."""
    made = {p: h for p, h in digests(root).items() if p.startswith(("data/", "models/", "dvclive/cnn/", "metrics/scan.json", "metrics/split.json"))}
    assert {"models/cnn/model.safetensors", "dvclive/cnn/metrics.json", "data/stats/stats.json"} <= made.keys(), sorted(made)
    assert not any(p.startswith(("models/resnet10t", "predictions/")) for p in digests(root)), "ran past the target"
    assert {p: BASELINE.get(p) for p in made} == made


def test_dvc_killed_mid_training_reruns_to_the_same_results(engines, tmp_path):
    """The pipeline up to one training (what follows is the same whether or not a kill came before)."""
    assert BASELINE
    root = repo_copy(tmp_path / "dvc")
    _kill_mid_training(root, "dvc", "repro", "train@cnn")
    log = sh(root, "dvc", "repro", "train@cnn")
    assert "resuming after epoch 1" in log
    assert {"check", "download", "scan", "split", "stats"}.isdisjoint(dvc_ran(log)), "finished stages ran again"
    _same_as_baseline(root)
    assert "up to date" in sh(root, "dvc", "status", "train@cnn").lower()


def test_snakemake_killed_mid_training_reruns_to_the_same_results(engines, tmp_path):
    root = repo_copy(tmp_path / "snakemake")
    target = "models/cnn/model.safetensors"
    _kill_mid_training(root, "snakemake", target, *SNAKE_PARALLEL)  # targets first: --resources takes several words
    refused = sh(root, "snakemake", target, *SNAKE_PARALLEL, ok=False)  # Snakemake keeps its lock after a kill -9 ...
    assert "Directory cannot be locked" in refused and "--unlock" in refused
    sh(root, "snakemake", "--unlock")  # ... and says how to release it (the README does too)
    log = sh(root, "snakemake", target, *SNAKE_PARALLEL)  # rerun-incomplete (profiles/default) reruns the killed job
    assert "resuming after epoch 1" in log
    _same_as_baseline(root)
    assert "Nothing to be done" in sh(root, "snakemake", "--dry-run", "--cores", "2", target)


def test_a_split_param_plans_split_and_everything_after_it_not_download_or_scan(engines):
    """``split.folds`` and ``split.groups`` (the demo's slides): both engines find split and everything after it
    out of date, not download or scan (tests/test_e2e_folds.py runs that pipeline through both engines)."""
    dvc_root, snake_root, _, _ = engines
    kept = {root: (root / "params.yaml").read_text() for root in (dvc_root, snake_root)}
    try:
        for root in (dvc_root, snake_root):
            sh(root, "hcd", "demo-truth", "data/groups")
            set_params(root, split={"folds": 3, "groups": "data/groups/demo_slides.csv"})
        assert snakemake_would_run(snake_root) == ALL_STAGES - {"download", "scan"}
        assert set(json.loads(sh(dvc_root, "dvc", "status", "--json"))) == {"check", "split", "export"}
    finally:
        for root, text in kept.items():
            (root / "params.yaml").write_text(text)
            for made in ("demo_slides.csv", "demo_test_labels.csv"):  # hcd demo-truth's files: the folder is a dependency of split
                (root / "data/groups" / made).unlink(missing_ok=True)
    assert snakemake_would_run(snake_root) == set()


SLURM_SCRIPT = REPO / "tests/cluster/slurm.sh"
# profiles/slurm as a user runs it, plus what this one-node test cluster needs: its partition, no account
# (no accounting database), squeue for job states (sacct needs slurmdbd), threads for a 2-CPU node, and
# status checks from the first second (the plugin waits 40 s by default).
SLURM_RUN = ("snakemake", "--workflow-profile", "profiles/slurm", "--default-resources", "slurm_partition=debug", "runtime=30", "--set-threads", "download=1", "scan=2", "train=1", "predict=1", "explain=1", "--slurm-no-account", "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "1", "--latency-wait", "5", "--jobs", "4")


def slurm_or_skip() -> None:
    """Start the one-node SLURM of tests/cluster/slurm.sh (installs it as root when missing); skip with its reason otherwise."""
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    proc = subprocess.run(["bash", str(SLURM_SCRIPT), "start"], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.skip(f"SLURM could not be started here: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")


def squeue(*fmt: str) -> list[list[str]]:
    out = subprocess.run(["squeue", "-h", "-t", "all", "-o", " ".join(fmt)], capture_output=True, text=True, check=True).stdout
    return [line.split() for line in out.splitlines() if line.strip()]


def test_slurm_runs_every_job_through_sbatch_survives_scancel_and_matches(engines, tmp_path):
    """The tiny pipeline through profiles/slurm on a real one-node SLURM: every rule is a SLURM job, one
    training is scancel'd mid-run and resubmitted by Snakemake (resuming from its checkpoint), and the
    outputs equal the local run's byte for byte. A bad partition fails at sbatch with SLURM's reason."""
    slurm_or_skip()
    assert BASELINE
    root = repo_copy(tmp_path / "slurm")
    proc = subprocess.Popen(SLURM_RUN, cwd=root, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 900
    while proc.poll() is None and time.time() < deadline and not list(root.glob("models/cnn/checkpoint.pt")):
        time.sleep(0.2)
    jobs = {comment: (jobid, name) for jobid, name, state, comment in squeue("%i", "%j", "%T", "%k") if state == "RUNNING"}
    assert "rule_train_wildcards_cnn" in jobs, f"no running training job to cancel: {jobs}"
    jobid, run_id = jobs["rule_train_wildcards_cnn"]
    subprocess.run(["scancel", jobid], check=True)
    log = proc.communicate(timeout=1200)[0]
    LOGS.append(log)
    assert proc.returncode == 0, log[-3000:]
    assert f"SLURM-job '{jobid}' failed, SLURM status is: 'CANCELLED'" in log and "rule_train/cnn/" in log  # the rule, the reason, the log path
    assert "resuming after epoch 1" in (root / "logs/train/cnn.log").read_text(), "the resubmitted training started over"
    assert digests(root) == BASELINE
    assert snakemake_would_run(root) == set()
    ours = [row for row in squeue("%i", "%j", "%T", "%k") if row[1] == run_id]
    rules = {row[3].removeprefix("rule_").split("_wildcards_")[0] for row in ours}
    assert rules == {stage.split("@")[0] for stage in ALL_STAGES}, rules  # every rule went through sbatch
    assert [row[2] for row in ours].count("CANCELLED") == 1 and len(ours) == len(ALL_STAGES) + 1  # one job per stage, plus the resubmission
    completed = subprocess.run(["sacct", "--completion", "-n", "-P", "-o", "JobID,JobName,State"], capture_output=True, text=True).stdout
    assert sum(f"|{run_id}|COMPLETED" in line for line in completed.splitlines()) == len(ours) - 1  # sacct lists them too

    bad = repo_copy(tmp_path / "bad-partition")
    out = sh(bad, *(a.replace("slurm_partition=debug", "slurm_partition=nope") for a in SLURM_RUN), "data/check/params.json", ok=False)
    assert "Error in rule check:" in out and "invalid partition specified: nope" in out, out[-2000:]  # the rule, and SLURM's reason
    assert not (bad / "data/check/params.json").exists()


@pytest.mark.skipif(not os.environ.get("HCD_SLURM_FAULTS"), reason="long variant (a training run past a 1-minute SLURM time limit: 386 s measured): HCD_SLURM_FAULTS=1")
def test_slurm_time_limit_and_out_of_memory_name_the_rule_reason_and_log_and_the_rerun_resumes(tmp_path):
    """A training past its SLURM time limit, and a predict over its memory, each fail their rule with
    SLURM's state and the job's log path (whose last lines say why); the same command with enough
    time or memory then finishes, the training resuming from its last checkpoint."""
    slurm_or_skip()
    root = repo_copy(tmp_path / "faults", models={"cnn": {"epochs": 250}})  # about 150 s: it outlives a 1-minute limit (0.6 s an epoch here)

    def run(target: str, *extra: str, ok: bool = True) -> str:  # the target first: --set-resources takes several words
        return sh(root, SLURM_RUN[0], target, *SLURM_RUN[1:], "--retries", "0", *extra, ok=ok)  # each fault once (the profile retries once)

    out = run("models/cnn/model.safetensors", "--set-resources", "train:runtime=1", ok=False)
    assert "Error in rule train:" in out and "SLURM status is: 'TIMEOUT'" in out, out[-3000:]
    log = re.search(r"(\S*slurm_logs/rule_train/cnn/\d+\.log)", out)
    assert log and "DUE TO TIME LIMIT" in (root / log.group(1)).read_text(), out[-3000:]
    assert (root / "models/cnn/checkpoint.pt").exists() and not (root / "models/cnn/model.safetensors").exists()
    run("models/cnn/model.safetensors")  # the profile's 720 minutes
    assert re.search(r"resuming after epoch [1-9]\d*", (root / "logs/train/cnn.log").read_text())

    out = run("predictions/cnn/val.csv", "--set-resources", "predict:mem_mb=150", ok=False)
    assert "Error in rule predict:" in out and re.search(r"SLURM status is: '(OUT_OF_MEMORY|FAILED)'", out), out[-3000:]  # FAILED without cgroups (SLURM's sampler kills it)
    log = re.search(r"(\S*slurm_logs/rule_predict/cnn/\d+\.log)", out)
    assert log and "exceeded memory limit" in (root / log.group(1)).read_text(), out[-3000:]
    assert not (root / "predictions/cnn/val.csv").exists()
    run("predictions/cnn/val.csv")
    assert (root / "predictions/cnn/val.csv").exists()


def test_kaggle_credentials_appear_nowhere_a_run_wrote_or_printed(engines, tmp_path):
    """Runs last: greps both engines' copies after every test above ran in them, plus a failing Kaggle download."""
    dvc_root, snake_root, _, _ = engines
    kaggle_root = repo_copy(tmp_path / "kaggle", data={"source": "kaggle"})  # offline here: the download fails as on a network error
    assert "hcd download: error: kaggle:" in sh(kaggle_root, "dvc", "repro", "download", ok=False)
    assert "hcd download: error: kaggle:" in sh(kaggle_root, "snakemake", "--cores", "1", "data/raw/hcd.zip", ok=False)
    assert key_nowhere((dvc_root, snake_root, kaggle_root), LOGS) > 100
    assert list(snake_root.glob(".snakemake/log/*.log")) and list(kaggle_root.glob(".snakemake/log/*.log"))


def key_nowhere(roots: tuple[Path, ...], logs: list[str]) -> int:
    """Asserts the fake Kaggle key is in no file under the roots, their git history, or the logs; the files read."""
    secret = SECRET.encode()
    checked = 0
    for root in roots:
        for f in root.rglob("*"):  # outputs, params, dvc.lock, .dvc/ (cache, tmp, logs), .snakemake/ (logs, metadata)
            if f.is_file() and not f.is_symlink() and ".git" not in f.relative_to(root).parts:
                assert secret not in f.read_bytes(), f"the Kaggle key is in {f}"
                checked += 1
        history = subprocess.run(["git", "log", "-p", "--all"], cwd=root, capture_output=True, text=True).stdout
        assert SECRET not in history
    assert logs and not [log for log in logs if SECRET in log], "the Kaggle key was printed"
    return checked
