"""Stage ``report``: the run's figures for people, in ``report/`` — what ``snakemake --report`` and
``dvc plots show`` put on a page.

* ``scan.png``      — what the scan flagged, by reason, with flagged patches as they look;
* ``split.png``     — patches and positive fraction per side (or per fold);
* ``training.png``  — validation AUC and train/validation loss per epoch, one panel per backbone (a line per fold);
* ``roc.png``       — ROC and precision-recall, one line per backbone and the ensemble, AUC in the legend;
* ``auc.png``       — AUC with its bootstrap 95 % interval per backbone and ensemble (and the spread over folds);
* ``confusion.png`` — the ensemble's confusion matrices at 0.5 and at the Youden threshold.

Every figure is rendered with matplotlib's Agg backend without a timestamp, so both
engines write the same bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from hcd.atomic import Commit, clean_stale_temps, read_json
from hcd.data.source import open_source
from hcd.data.tiff import PatchError, decode_patch
from hcd.errors import HcdError
from hcd.model.meta import read_model_meta
from hcd.pipeline.params import load_params
from hcd.pipeline.table import REPORT_FIGURES as FIGURES
from hcd.pipeline.table import per_backbone

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.savefig(path, format="png", dpi=90, metadata={"Software": None})  # the temporary name has no .png
    _plt().close(fig)


def scan_figure(path: Path, summary: dict, report: pd.DataFrame, raw: Path) -> None:
    plt = _plt()
    flagged = summary.get("flagged", {})
    examples = report.drop_duplicates("reason").head(8)
    fig = plt.figure(figsize=(11, 4.4))
    ax = fig.add_axes((0.22, 0.12, 0.3, 0.75))
    names = list(flagged) or ["nothing flagged"]
    ax.barh(names, [flagged.get(n, 0) for n in names], color="#b05050")
    ax.invert_yaxis()
    ax.set_xlabel("patches")
    t, s = summary["train"], summary["test"]
    ax.set_title(f"scan: {t['labelled_rows']:,} labelled, {t['packed']:,} packed; {s['submission_rows']:,} test", fontsize=10)
    refs = _refs(raw)
    for i, (_, row) in enumerate(examples.iterrows()):
        sub = fig.add_axes((0.58 + (i % 4) * 0.105, 0.5 - (i // 4) * 0.42, 0.095, 0.32))
        sub.axis("off")
        img = _patch(refs, row["split"], row["id"])
        if img is not None:
            sub.imshow(img)
        else:
            sub.text(0.5, 0.5, "cannot\nbe shown", ha="center", va="center", fontsize=7)
        sub.set_title(f"{row['split']}: {row['reason']}", fontsize=7)
    _save(fig, path)


def _refs(raw: Path):
    try:
        src = open_source(raw)
        return src, src.listing()
    except HcdError:
        return None


def _patch(refs, split: str, pid: str) -> np.ndarray | None:
    if refs is None:
        return None
    src, listing = refs
    ref = (listing.train if split == "train" else listing.test).get(pid)
    if ref is None:
        return None
    try:
        return decode_patch(src.read(ref))
    except PatchError:
        return None


def split_figure(path: Path, balance: dict) -> None:
    plt = _plt()
    if "per_fold" in balance:
        parts = [(f"fold {f['fold']}", f) for f in balance["per_fold"]]
        what = f"{balance['folds']} folds" + (" (grouped by slide)" if balance["grouped"] else "")
    else:
        parts = [("train", balance["train"]), ("validation", balance["val"])]
        what = "train / validation" + (" (grouped by slide)" if balance["grouped"] else "")
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    labels = [n for n, _ in parts]
    a.bar(labels, [p["n"] for _, p in parts], color="#6a8fb5")
    a.set_ylabel("patches")
    b.bar(labels, [p["positive_fraction"] for _, p in parts], color="#b56a6a")
    b.set_ylabel("positive fraction")
    b.set_ylim(0, 1)
    fig.suptitle(f"split: {what}", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


_EPOCH_KEYS = ("epoch", "train_loss", "val_loss", "val_auc")


def _with_history(path: Path) -> dict:
    """``model.json``, checked as inference checks it, with the per-epoch history the training figure draws."""
    meta = read_model_meta(path)
    runs = [(f"fold_models.{k}.history", f.get("history")) for k, f in enumerate(meta["fold_models"])] if meta.get("fold_models") else [("history", meta.get("history"))]
    for key, hist in runs:
        ok = isinstance(hist, list) and bool(hist) and all(isinstance(h, dict) and all(isinstance(h.get(k), (int, float)) and not isinstance(h.get(k), bool) for k in _EPOCH_KEYS) for h in hist)
        if not ok:
            raise HcdError(f"{path}: {key}: missing, or not a list of epochs with {', '.join(_EPOCH_KEYS)} (rerun train)")
    return meta


def training_figure(path: Path, metas: dict[str, dict]) -> None:
    plt = _plt()
    fig, axes = plt.subplots(2, len(metas), figsize=(4.2 * len(metas), 5.6), squeeze=False)
    for j, (b, meta) in enumerate(metas.items()):
        runs = [(f"fold {f['fold']}", f["history"]) for f in meta["fold_models"]] if meta.get("fold_models") else [("", meta["history"])]
        for k, (label, hist) in enumerate(runs):
            ep = [h["epoch"] for h in hist]
            color = COLORS[k % len(COLORS)]
            axes[0, j].plot(ep, [h["val_auc"] for h in hist], marker="o", ms=3, color=color, label=label or "validation AUC")
            axes[1, j].plot(ep, [h["train_loss"] for h in hist], color=color, ls="--", label=f"{label} train".strip())
            axes[1, j].plot(ep, [h["val_loss"] for h in hist], color=color, label=f"{label} validation".strip())
        axes[0, j].set_title(f"{b} — validation AUC", fontsize=10)
        axes[1, j].set_title(f"{b} — loss", fontsize=10)
        for ax in axes[:, j]:
            ax.set_xlabel("epoch")
            ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def roc_figure(path: Path, curves: dict[str, tuple[pd.DataFrame, pd.DataFrame]], metrics: dict) -> None:
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.4))
    for k, (name, (roc, prc)) in enumerate(curves.items()):
        style = {"color": "black", "lw": 2.2} if name == "ensemble" else {"color": COLORS[k % len(COLORS)], "lw": 1.3}
        a.plot(roc["fpr"], roc["tpr"], label=f"{name} (AUC {metrics[name]['auc']:.4f})", **style)
        b.plot(prc["recall"], prc["precision"], label=name, **style)
    a.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    a.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (held-out patches)")
    b.set(xlabel="recall", ylabel="precision", title="precision-recall (held-out patches)")
    a.legend(fontsize=8, loc="lower right")
    b.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    _save(fig, path)


def auc_figure(path: Path, names: list[str], metrics: dict) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.55 * len(names) + 1.4))
    auc = [metrics[n]["auc"] for n in names]
    lo = [metrics[n]["auc"] - metrics[n]["auc_ci95"][0] for n in names]
    hi = [metrics[n]["auc_ci95"][1] - metrics[n]["auc"] for n in names]
    ax.errorbar(auc, names, xerr=[lo, hi], fmt="o", color="black", capsize=4, label="AUC, bootstrap 95 % interval")
    for n in names:
        if "folds" in metrics[n]:
            f = metrics[n]["folds"]
            ax.plot([f["min"], f["max"]], [n, n], color="#c05050", lw=6, alpha=0.35, solid_capstyle="butt")
    for y, a in zip(names, auc):
        ax.annotate(f"{a:.4f}", (a, y), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ROC AUC (held-out patches)" + ("; red band: range over folds" if any("folds" in metrics[n] for n in names) else ""))
    ax.set_title("AUC per backbone and ensemble", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def confusion_figure(path: Path, ens: pd.DataFrame, youden: float) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
    y = ens["label"].to_numpy()
    for ax, (name, thr) in zip(axes, (("threshold 0.5", 0.5), (f"Youden threshold {youden:.3f}", youden))):
        pred = (ens["prob"].to_numpy() >= thr).astype(int)
        m = np.array([[int(((y == a) & (pred == b)).sum()) for b in (0, 1)] for a in (0, 1)])
        ax.imshow(m, cmap="Blues")
        for a in (0, 1):
            for b in (0, 1):
                ax.text(b, a, f"{m[a, b]:,}", ha="center", va="center", color="white" if m[a, b] > m.max() / 2 else "black")
        ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["normal", "tumour"], yticklabels=["normal", "tumour"], xlabel="predicted", ylabel="actual", title=f"ensemble, {name}")
    fig.tight_layout()
    _save(fig, path)


def report(model_jsons: dict[str, Path], scan_json: Path, scan_report: Path, raw: Path, split_json: Path, metrics_json: Path, roc_json: Path, prc_json: Path, ensemble_val: Path, figures: dict[str, Path], log=print) -> list[Path]:
    """``model_jsons``: each backbone's model.json, in params.yaml's order; ``figures``: where each of FIGURES goes."""
    backbones = list(model_jsons)
    metrics = read_json(metrics_json)
    metas = {b: _with_history(path) for b, path in model_jsons.items()}
    names = [*backbones, "ensemble"]
    try:
        roc = pd.DataFrame(json.loads(roc_json.read_text())["roc"])
        prc = pd.DataFrame(json.loads(prc_json.read_text())["prc"])
    except FileNotFoundError as exc:
        raise HcdError(f"{exc.filename}: not found (run metrics first)") from None
    curves = {n: (roc[roc["model"] == n], prc[prc["model"] == n]) for n in names}
    written = []
    with Commit() as commit:
        paths = {f: commit.path(figures[f]) for f in FIGURES}
        scan_figure(paths["scan"], read_json(scan_json), pd.read_csv(scan_report, dtype={"id": str}), raw)
        split_figure(paths["split"], read_json(split_json))
        training_figure(paths["training"], metas)
        roc_figure(paths["roc"], curves, metrics)
        auc_figure(paths["auc"], names, metrics)
        confusion_figure(paths["confusion"], pd.read_csv(ensemble_val, dtype={"id": str}), metrics["ensemble"]["at_youden"]["threshold"])
        written = [figures[f] for f in FIGURES]
    log(f"report: {len(written)} figures in {', '.join(sorted({str(p.parent) for p in written}))}/ (snakemake --report report.html puts them on one page)")
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="hcd report", description=__doc__.splitlines()[0])
    ap.add_argument("--scan", required=True, help="scan counts (metrics/scan.json)")
    ap.add_argument("--scan-report", required=True, help="flagged patches (data/scan/report.csv)")
    ap.add_argument("--raw", required=True, help="the archive, for pictures of flagged patches (data/raw/hcd.zip)")
    ap.add_argument("--split", required=True, help="split balance (metrics/split.json)")
    ap.add_argument("--model-json", required=True, help="each backbone's model.json (the training curves), {item} standing for its name (models/{item}/model.json)")
    ap.add_argument("--metrics", required=True, help="every metric (metrics/metrics.json)")
    ap.add_argument("--roc", required=True, help="ROC data (plots/roc.json)")
    ap.add_argument("--prc", required=True, help="precision-recall data (plots/prc.json)")
    ap.add_argument("--ensemble", required=True, help="the ensemble's held-out predictions (results/ensemble/val.csv)")
    ap.add_argument("--figures", required=True, nargs="+", help=f"the figures to write, each named after what it shows: {', '.join(f'<dir>/{f}.png' for f in FIGURES)} (report/scan.png …)")
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml; reads backbones)")
    args = ap.parse_args(argv)
    figures = {Path(f).stem: Path(f) for f in args.figures}
    if sorted(figures) != sorted(FIGURES) or len(args.figures) != len(FIGURES):
        raise HcdError(f"--figures: expected one .png each named {', '.join(FIGURES)}; got {', '.join(args.figures)}")
    clean_stale_temps(*figures.values())
    backbones = load_params(args.params).backbones
    report(per_backbone(args.model_json, backbones), Path(args.scan), Path(args.scan_report), Path(args.raw), Path(args.split), Path(args.metrics), Path(args.roc), Path(args.prc), Path(args.ensemble), figures, log=lambda m: print(m, file=sys.stderr))
