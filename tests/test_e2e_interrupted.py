"""Interrupted runs of the tiny pipeline, each compared with the session's uninterrupted baseline.

On a real one-node SLURM (``tests/cluster/slurm.sh``, through ``profiles/slurm``) one training job is
scancel'd and resubmitted; ``dvc repro`` and ``snakemake`` are each killed with SIGKILL mid-training and
rerun. Every rerun resumes from its checkpoint and ends byte-identical to the baseline of
``tests/test_e2e.py``, which is built once per session by whichever file asks first
(``test_e2e.baseline``): these runs take minutes each, so they have a file, and a pytest-xdist worker, of
their own, and need the baseline only when they compare. Nothing they wrote or printed holds the fake
Kaggle key (last test).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO
from test_e2e import ALL_STAGES, ENV, LOGS, SNAKE_PARALLEL, baseline, digests, dvc_ran, key_nowhere, repo_copy, sh, snakemake_would_run

pytestmark = pytest.mark.e2e
ROOTS: list[Path] = []  # every workspace a test here ran in, for the credentials test


def workspace(dest: Path) -> Path:
    """A fresh copy of the repository with the tiny config (``test_e2e.repo_copy``), remembered in ROOTS."""
    ROOTS.append(repo_copy(dest))
    return ROOTS[-1]


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


def test_slurm_runs_every_job_through_sbatch_survives_scancel_and_matches(tmp_path_factory, tmp_path):
    """The tiny pipeline through profiles/slurm on a real one-node SLURM: every rule is a SLURM job, one
    training is scancel'd mid-run and resubmitted by Snakemake (resuming from its checkpoint), and the
    outputs equal the local run's byte for byte. A bad partition fails at sbatch with SLURM's reason."""
    slurm_or_skip()
    root = workspace(tmp_path / "slurm")
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
    assert digests(root) == baseline(tmp_path_factory)[4]  # built meanwhile by whichever worker asked first
    assert snakemake_would_run(root) == set()
    ours = [row for row in squeue("%i", "%j", "%T", "%k") if row[1] == run_id]
    rules = {row[3].removeprefix("rule_").split("_wildcards_")[0] for row in ours}
    assert rules == {stage.split("@")[0] for stage in ALL_STAGES}, rules  # every rule went through sbatch
    assert [row[2] for row in ours].count("CANCELLED") == 1 and len(ours) == len(ALL_STAGES) + 1  # one job per stage, plus the resubmission
    completed = subprocess.run(["sacct", "--completion", "-n", "-P", "-o", "JobID,JobName,State"], capture_output=True, text=True).stdout
    assert sum(f"|{run_id}|COMPLETED" in line for line in completed.splitlines()) == len(ours) - 1  # sacct lists them too

    bad = workspace(tmp_path / "bad-partition")
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


def _same_as_baseline(root: Path, reference: dict[str, str]) -> None:
    """What a run up to train@cnn made equals the uninterrupted full run's files of the same names."""
    made = {p: h for p, h in digests(root).items() if p.startswith(("data/", "models/", "dvclive/cnn/", "metrics/scan.json", "metrics/split.json"))}
    assert {"models/cnn/model.safetensors", "dvclive/cnn/metrics.json", "data/stats/stats.json"} <= made.keys(), sorted(made)
    assert not any(p.startswith(("models/resnet10t", "predictions/")) for p in digests(root)), "ran past the target"
    assert {p: reference.get(p) for p in made} == made


def test_dvc_killed_mid_training_reruns_to_the_same_results(tmp_path_factory, tmp_path):
    """The pipeline up to one training (what follows is the same whether or not a kill came before)."""
    root = workspace(tmp_path / "dvc")
    _kill_mid_training(root, "dvc", "repro", "train@cnn")
    log = sh(root, "dvc", "repro", "train@cnn")
    assert "resuming after epoch 1" in log
    assert {"check", "download", "scan", "split", "stats"}.isdisjoint(dvc_ran(log)), "finished stages ran again"
    _same_as_baseline(root, baseline(tmp_path_factory)[4])
    assert "up to date" in sh(root, "dvc", "status", "train@cnn").lower()


def test_snakemake_killed_mid_training_reruns_to_the_same_results(tmp_path_factory, tmp_path):
    root = workspace(tmp_path / "snakemake")
    target = "models/cnn/model.safetensors"
    _kill_mid_training(root, "snakemake", target, *SNAKE_PARALLEL)  # targets first: --resources takes several words
    refused = sh(root, "snakemake", target, *SNAKE_PARALLEL, ok=False)  # Snakemake keeps its lock after a kill -9 ...
    assert "Directory cannot be locked" in refused and "--unlock" in refused
    sh(root, "snakemake", "--unlock")  # ... and says how to release it (the README does too)
    log = sh(root, "snakemake", target, *SNAKE_PARALLEL)  # rerun-incomplete (profiles/default) reruns the killed job
    assert "resuming after epoch 1" in log
    _same_as_baseline(root, baseline(tmp_path_factory)[4])
    assert "Nothing to be done" in sh(root, "snakemake", "--dry-run", "--cores", "2", target)


def test_kaggle_credentials_appear_nowhere_these_runs_wrote_or_printed():
    """Runs last in this file: the key in the environment of every run above is in nothing they made or printed."""
    if not ROOTS:
        pytest.skip("no run above made a workspace")
    assert key_nowhere(tuple(ROOTS), LOGS) > 50
