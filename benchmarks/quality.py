"""Quality of the default recipe, from a fresh clone: demo data and the real sample.

Usage:
    python benchmarks/quality.py [--real ZIP --labels CSV] [--skip-demo] [--out FILE]

1. Demo: clones this repository's HEAD into a temporary folder and runs
   `dvc repro` on the defaults; prints the wall time of the whole pipeline and of
   each stage, and the validation and test AUC (the demo knows its test labels) of
   every backbone and of the ensemble. Targets: <= 10 minutes on 2 idle CPU cores,
   ensemble validation AUC 0.88-0.96 and within 0.04 of the real sample's test AUC.
2. Real sample (``--real``, default $HCD_REAL_ZIP): the same defaults with
   ``data.source: zip``; prints each training stage's time, scores
   ``results/submission.csv`` against ``--labels`` with `hcd score`, and every
   backbone's test AUC. Targets: training <= 10 minutes, submission test AUC
   >= 0.85, ensemble not below the best single backbone.
4. Levers (``--levers tta,lr,groups,folds``): the demo (and the real sample with ``--real``) once per
   lever beside the defaults — ``tta``: predict.tta 1 instead of 8; ``lr``: lr 1e-3; ``groups``
   (demo only): split.groups by slide; ``folds``: split.folds 5 — each run's ensemble validation
   and test AUC with its 95 % interval's half-width, and the default run's ensemble against its
   best single backbone: which levers move the AUC by more than the noise, side by side.
3. Folds (``--folds 1,5``): the real sample once per ``split.folds`` value, same
   backbones and epochs otherwise; prints each run's test AUC (`hcd score`), its
   out-of-fold or validation AUC and its wall time side by side, so whether folds
   pay for themselves is read off one run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml
from sklearn.metrics import roc_auc_score

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hcd.atomic import write_json  # noqa: E402

ENV = {**os.environ, "DVC_NO_ANALYTICS": "1"}


def clone(dest: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True)
    return dest


def timed_repro(root: Path) -> tuple[float, dict[str, float], str]:
    """`dvc repro`, streaming its output: total seconds and seconds per stage."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(["dvc", "repro"], cwd=root, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stages: dict[str, float] = {}
    current, started, lines = None, t0, []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        m = re.match(r"Running stage '([\w@.-]+)'", line)
        if m:
            now = time.perf_counter()
            if current:
                stages[current] = round(now - started, 1)
            current, started = m.group(1), now
    proc.wait()
    total = time.perf_counter() - t0
    if current:
        stages[current] = round(time.perf_counter() - started, 1)
    log = "".join(lines)
    if proc.returncode != 0:
        raise SystemExit(f"dvc repro failed in {root}:\n{log[-3000:]}")
    return round(total, 1), stages, log


def set_params(root: Path, **changes) -> None:
    path = root / "params.yaml"
    p = yaml.safe_load(path.read_text())
    for k, v in changes.items():
        node = p
        *parents, last = k.split(".")
        for q in parents:
            node = node.setdefault(q, {})
        node[last] = v
    path.write_text(yaml.safe_dump(p, sort_keys=False))


def demo(work: Path, name: str = "demo", **changes) -> dict:
    root = clone(work / name)
    if changes:
        set_params(root, **changes)
    if changes.get("split.groups"):
        subprocess.run([sys.executable, "-m", "hcd", "demo-truth", "data/groups"], cwd=root, env=ENV, check=True, capture_output=True)
    total, stages, _ = timed_repro(root)
    m = json.loads((root / "metrics/metrics.json").read_text())
    backbones = [k for k in m if isinstance(m[k], dict) and "auc" in m[k] and k != "ensemble"]
    out = {
        "pipeline_seconds": total,
        "stage_seconds": stages,
        "val_auc": {k: round(m[k]["auc"], 4) for k in [*backbones, "ensemble"]},
        "val_ci_half": {k: round((m[k]["auc_ci95"][1] - m[k]["auc_ci95"][0]) / 2, 4) for k in [*backbones, "ensemble"]},
        "test_auc": {k: round(m[k]["test"]["auc"], 4) for k in [*backbones, "ensemble"]},
        "test_ci_half": {k: round((m[k]["test"]["auc_ci95"][1] - m[k]["test"]["auc_ci95"][0]) / 2, 4) for k in [*backbones, "ensemble"]},
        "ensemble_val_auc": round(m["ensemble"]["auc"], 4),
    }
    out["targets"] = {"pipeline_seconds <= 600": total <= 600, "0.88 <= ensemble_val_auc <= 0.96": 0.88 <= m["ensemble"]["auc"] <= 0.96}
    print(f"{name}: whole pipeline {total:.0f} s (target <= 600); per stage: {stages}")
    print(f"{name}: validation AUC {out['val_auc']}, test AUC {out['test_auc']} (ensemble validation target 0.88-0.96)")
    return out


LEVERS = {"tta": {"predict.tta": 1}, "lr": {"lr": 0.001}, "groups": {"split.groups": "data/groups/demo_slides.csv"}, "folds": {"split.folds": 5}}


def levers(work: Path, names: list[str], real_archive: Path | None, labels: Path | None, base: dict) -> dict:
    """Each lever's run beside the defaults (``base``: the default runs, demo and real): the ensemble's
    validation and test AUC, how far each moved, and whether that is more than the interval's half-width."""
    out: dict = {}
    rows = []
    for data in ("demo", "real") if real_archive else ("demo",):
        ref = base[data]
        best = max((k for k in ref["test_auc"] if k != "ensemble"), key=lambda k: ref["test_auc"][k])
        rows.append((data, "ensemble vs best single", ref["test_auc"]["ensemble"] - ref["test_auc"][best], ref["test_ci_half"]["ensemble"], f"best single: {best}"))
        for lever in names:
            if data == "real" and lever == "groups":
                continue  # the sample has no slide map
            run = demo(work, f"demo-{lever}", **LEVERS[lever]) if data == "demo" else real(work, real_archive, labels, changes=LEVERS[lever], name=f"real-{lever}")
            out[f"{data}:{lever}"] = run
            rows.append((data, lever, run["test_auc"]["ensemble"] - ref["test_auc"]["ensemble"], ref["test_ci_half"]["ensemble"], f"validation {ref['val_auc']['ensemble']:.4f} -> {run['val_auc']['ensemble']:.4f}"))
    print(f"{'data':<5} {'lever':<24} {'test AUC moved':>14} {'95 % half-width':>16}  shows?  note")
    for data, lever, moved, half, note in rows:
        print(f"{data:<5} {lever:<24} {moved:>+14.4f} {half:>16.4f}  {'yes' if abs(moved) > half else 'no ':<6}  {note}")
    out["table"] = [dict(zip(("data", "lever", "test_auc_moved", "ci_half_width", "note"), r)) for r in rows]
    return out


def real(work: Path, archive: Path, labels: Path, folds: int | None = None, changes: dict | None = None, name: str | None = None) -> dict:
    root = clone(work / (name or (f"real-folds{folds}" if folds else "real")))
    set_params(root, **{"data.source": "zip", "data.path": str(archive.resolve())})
    if folds:
        set_params(root, **{"split.folds": folds})
    if changes:
        set_params(root, **changes)
    total, stages, _ = timed_repro(root)
    score = subprocess.run([sys.executable, "-m", "hcd", "score", "results/submission.csv", str(labels.resolve())], cwd=root, env=ENV, capture_output=True, text=True, check=True).stdout.strip()
    truth = pd.read_csv(labels, dtype={"id": str})
    params = yaml.safe_load((root / "params.yaml").read_text())
    test_auc = {}
    for b in params["backbones"]:
        pred = pd.read_csv(root / "predictions" / b / "test.csv", dtype={"id": str}).merge(truth, on="id")
        test_auc[b] = round(float(roc_auc_score(pred["label"], pred["prob"])), 4)
    sub = pd.read_csv(root / "results/submission.csv", dtype={"id": str}).merge(truth, on="id", suffixes=("_pred", ""))
    test_auc["ensemble"] = round(float(roc_auc_score(sub["label"], sub["label_pred"])), 4)
    train_s = round(sum(v for k, v in stages.items() if k.startswith("train@")), 1)
    best_single = max(v for k, v in test_auc.items() if k != "ensemble")
    held = json.loads((root / "metrics/metrics.json").read_text())
    infer_diff = infer_check(root, archive)
    test_ci = {k: [float(x) for x in re.findall(r"95% CI ([\d.]+)-([\d.]+)", score)[0]] for k in ["ensemble"]}
    out = {
        "pipeline_seconds": total,
        "train_seconds": train_s,
        "held_out_auc": {k: round(held[k]["auc"], 4) for k in test_auc},  # validation side, or out-of-fold with folds
        "val_auc": {k: round(held[k]["auc"], 4) for k in test_auc},
        "test_ci_half": {k: round((v[1] - v[0]) / 2, 4) for k, v in test_ci.items()},
        "hcd_infer_max_abs_diff_vs_submission": infer_diff,
        "stage_seconds": stages,
        "hcd_score": score,
        "test_auc": test_auc,
        "targets": {
            "train_seconds <= 600": train_s <= 600,
            "submission_test_auc >= 0.85": test_auc["ensemble"] >= 0.85,
            "ensemble >= best single": test_auc["ensemble"] >= best_single,
        },
    }
    print(f"real: training {train_s:.0f} s (target <= 600), whole pipeline {total:.0f} s; per stage: {stages}")
    print(f"real: hcd score results/submission.csv labels -> {score}")
    print(f"real: test AUC per backbone and ensemble {test_auc} (target >= 0.85, ensemble >= best single {best_single})")
    return out


def infer_check(root: Path, archive: Path) -> float:
    """`hcd infer` from the run's export bundle on the archive's test/ patches, extracted to a folder
    as a user would: the largest difference from the run's results/submission.csv."""
    import zipfile

    folder = root / "real-test"
    with zipfile.ZipFile(archive) as zf:
        for name in zf.namelist():
            if name.startswith("test/") and name.endswith(".tif"):
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(zf.read(name))
    subprocess.run([sys.executable, "-m", "hcd", "infer", "export", str(folder / "test"), "--out", "infer.csv"], cwd=root, env=ENV, check=True, capture_output=True)
    got = pd.read_csv(root / "infer.csv", dtype={"id": str}, keep_default_na=False)
    sub = pd.read_csv(root / "results/submission.csv", dtype={"id": str}).merge(got, on="id", suffixes=("", "_infer"))
    assert len(sub) == len(got), "hcd infer predicted other ids than the submission's"
    diff = float((sub["label"] - pd.to_numeric(sub["label_infer"])).abs().max())
    print(f"real: hcd infer export {folder / 'test'} -> {len(got)} rows; max |diff| from results/submission.csv {diff:.2e}")
    return diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", default=os.environ.get("HCD_REAL_ZIP"))
    ap.add_argument("--labels", default=None, help="test labels CSV (default: beside --real, *-test-labels.csv)")
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--folds", default=None, help="comma-separated split.folds values to compare on the real sample, e.g. 1,5")
    ap.add_argument("--levers", default=None, help=f"comma-separated levers to run beside the defaults: {','.join(LEVERS)}")
    ap.add_argument("--out", default="benchmarks/out/quality.json")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.skip_demo:
            results["demo"] = demo(work)
        archive = Path(args.real) if args.real else None
        labels = (Path(args.labels) if args.labels else archive.with_name(archive.stem + "-test-labels.csv")) if archive else None
        if args.levers:
            if archive:
                results["real"] = real(work, archive, labels)
            results["levers"] = levers(work, args.levers.split(","), archive, labels, results)
        elif archive:
            if args.folds:
                runs = {int(k): real(work, archive, labels, int(k)) for k in args.folds.split(",")}
                results["real_folds"] = {str(k): v for k, v in runs.items()}
                for k, r in runs.items():
                    print(f"folds {k}: test AUC {r['test_auc']}, held-out AUC {r['held_out_auc']}, whole pipeline {r['pipeline_seconds']:.0f} s, training {r['train_seconds']:.0f} s")
            else:
                results["real"] = real(work, archive, labels)
    write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
