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

import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
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
SECRET = os.environ.get("HCD_TEST_KAGGLE_KEY") or secrets.token_hex(16)  # a fake Kaggle key, one per session (conftest.py: every xdist worker has the same), in no copied file: it must appear in nothing a run writes or prints
KAGGLE_DIR = Path(tempfile.mkdtemp(prefix="hcd-kaggle-"))
(KAGGLE_DIR / "kaggle.json").write_text(json.dumps({"username": "hcd-test", "key": SECRET}))
os.chmod(KAGGLE_DIR / "kaggle.json", 0o600)
ENV = {**{k: v for k, v in os.environ.items() if k != "HCD_TEST_KAGGLE_KEY"}, "DVC_NO_ANALYTICS": "1", "HCD_WORKERS": "2", "HCD_THREADS": "2", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
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


def baseline(tmp_path_factory) -> tuple[Path, Path, str, str, dict[str, str]]:
    """The tiny pipeline through both engines, run once per test session: the first test file to ask runs it,
    under a file lock in the folder every pytest-xdist worker shares; the others wait for it and read it.
    Returns both workspaces, both engines' logs, and the digests of every output (test_e2e.py alone changes
    the workspaces afterwards; other files use the digests)."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    done = shared / "e2e-baseline.json"
    with open(shared / "e2e-baseline.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # freed by the kernel if this worker dies
        if not done.exists():
            dvc_root = repo_copy(Path(tempfile.mkdtemp(prefix="dvc-", dir=shared)))
            snake_root = repo_copy(Path(tempfile.mkdtemp(prefix="snakemake-", dir=shared)))
            dvc_log, snake_log = side_by_side((dvc_root, ("dvc", "repro")), (snake_root, ("snakemake", *SNAKE_PARALLEL)))
            sh(dvc_root, "git", "add", "-A")
            sh(dvc_root, "git", "commit", "-qm", "baseline results")  # dvc.lock and metrics, for `dvc metrics diff`
            made = {"dvc_root": str(dvc_root), "snake_root": str(snake_root), "dvc_log": dvc_log, "snake_log": snake_log, "digests": digests(dvc_root)}
            tmp = done.with_suffix(".tmp")
            tmp.write_text(json.dumps(made))
            tmp.replace(done)
            return dvc_root, snake_root, dvc_log, snake_log, made["digests"]
    made = json.loads(done.read_text())
    LOGS.extend((made["dvc_log"], made["snake_log"]))  # printed in another worker: for this one's credentials test
    return Path(made["dvc_root"]), Path(made["snake_root"]), made["dvc_log"], made["snake_log"], made["digests"]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    dvc_root, snake_root, dvc_log, snake_log, made = baseline(tmp_path_factory)
    BASELINE.update(made)
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


def test_checkpoints_beside_the_models_rerun_nothing(engines):
    """A killed training's checkpoint, or one set aside as another run's (``checkpoint.pt.stale``), sits in
    models/<backbone>/; report and export depend on the models/ folder in DVC, which must not see them
    (.dvcignore): otherwise they rerun, and dvc.lock records a folder a clean checkout does not have."""
    dvc_root = engines[0]
    left = [dvc_root / "models/cnn/checkpoint.pt.stale", dvc_root / "models/resnet10t/checkpoint-fold1.pt"]
    for f in left:
        f.write_bytes(b"a checkpoint")
    try:
        assert "up to date" in sh(dvc_root, "dvc", "status"), "a checkpoint file changed a stage's dependencies"
    finally:
        for f in left:
            f.unlink()


def test_outputs_of_a_dropped_backbone_are_pruned_and_then_rerun_nothing(engines):
    """A backbone dropped from ``backbones`` leaves models/<b>/ and predictions/<b>/, which DVC's gathering stages
    (their deps are those folders) would record: `hcd pipeline prune` lists them (--dry-run), removes them, and
    dvc status is clean again; a folder that is not a backbone's output (local weights) stays."""
    import shutil

    dvc_root = engines[0]
    made = [dvc_root / "models/dropped", dvc_root / "predictions/dropped"]
    shutil.copytree(dvc_root / "models/cnn", made[0])
    shutil.copytree(dvc_root / "predictions/cnn", made[1])
    weights = dvc_root / "models/pretrained/resnet.pth"
    weights.parent.mkdir()
    try:
        weights.write_bytes(b"weights")
        assert "up to date" not in sh(dvc_root, "dvc", "status"), "DVC did not see the leftover folders"
        listed = sh(dvc_root, "hcd", "pipeline", "prune", "--dry-run")
        assert "would remove models/dropped" in listed and "would remove predictions/dropped" in listed, listed
        assert all(m.exists() for m in made)
        sh(dvc_root, "hcd", "pipeline", "prune")
        assert not any(m.exists() for m in made) and weights.exists()
        weights.unlink()
        weights.parent.rmdir()
        assert "up to date" in sh(dvc_root, "dvc", "status")
    finally:
        for m in [*made, weights.parent]:
            shutil.rmtree(m, ignore_errors=True)


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
    whose lr was also run alone (by the test above, or here when it did not run) has bit-identical models and predictions."""
    dvc_root, _, _, _ = engines
    if not ALONE:  # the test above did not run in this session (-k, a single test): run its experiment here
        sh(dvc_root, "dvc", "exp", "run", "-S", "lr=0.0005")
        ALONE.update(lock_outs(dvc_root))
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
