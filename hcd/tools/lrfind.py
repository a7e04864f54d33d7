"""``hcd lr-find BACKBONE`` (or ``--all``): the learning-rate range test, before a long run.

The learning rate grows exponentially from ``--start`` to ``--end`` over ``--steps``
training steps on the packed data, with the same batches, augmentation, model,
optimizer and device as the ``train`` stage (the training side of the split; fold
0's with ``split.folds``). The loss is smoothed (exponential moving average,
bias-corrected) and the test stops once it diverges (four times the best smoothed
loss, or not finite). Optionally for several weight decays (``--weight-decays
1e-6,1e-4,1e-2``, as notebook E swept).

The suggestion is the lr of the **steepest descent** of the smoothed loss (the most
negative slope against log lr, before the loss's minimum, the first tenth of the
curve skipped) — typically a factor 3–10 below where the loss bottoms out. It changes no params: the
command prints the `dvc exp run -S …` line that applies it. Writes
``lr-find/<backbone>.png`` (the curves, the suggestion marked), ``.csv`` (every step)
and ``.json`` (the suggestions).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from hcd.atomic import Commit
from hcd.data.packed import held_out, open_packed, read_split
from hcd.errors import HcdError
from hcd.pipeline.params import Params, load_params
from hcd.pipeline.table import PACKED, SPLIT, STATS
from hcd.runtime.device import pick_device, set_threads
from hcd.runtime.loop import train_steps
from hcd.runtime.seeding import seed_everything


def smooth(losses: list[float], beta: float = 0.95) -> np.ndarray:
    """Exponential moving average with bias correction (the first values are not pulled to 0)."""
    out, avg = [], 0.0
    for i, v in enumerate(losses):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** (i + 1)))
    return np.array(out)


def steepest(lrs: np.ndarray, smoothed: np.ndarray) -> float:
    """The lr where the smoothed loss falls fastest against log lr, looking only before the loss's
    minimum (past it the curve is divergence and noise) and skipping the first tenth."""
    n = len(lrs)
    if n < 5:
        raise HcdError(f"lr-find: the loss diverged after {n} steps; start lower (--start) or use more steps")
    lo = max(1, n // 10)
    hi = max(lo + 2, int(np.argmin(smoothed)) + 1)
    slope = np.gradient(smoothed, np.log(lrs))
    return float(lrs[lo + int(np.argmin(slope[lo:hi]))])


def range_test(backbone: str, params: Params, wd: float, inputs, steps: int, start: float, end: float, device: torch.device) -> pd.DataFrame:
    """One sweep: lr, loss and smoothed loss per step, until ``steps`` or divergence."""
    from hcd.stages.train import build_trainer

    _, cfg = params.for_backbone(backbone)
    seed_everything(params.seed)
    t = build_trainer(backbone, cfg.model_copy(update={"weight_decay": wd}), start, params.seed, inputs, device)
    ratio = (end / start) ** (1 / max(1, steps - 1))
    for g in t.opt.param_groups:  # the training schedule set its own initial lr: the sweep starts at `start`
        g["lr"] = g["initial_lr"] = start
    t.sched = torch.optim.lr_scheduler.LambdaLR(t.opt, lambda i: ratio**i)
    lrs: list[float] = []
    losses: list[float] = []
    state = {"best": float("inf"), "diverged": False}

    def on_step(step: int, lr: float, loss: float) -> bool:
        if not np.isfinite(loss):
            state["diverged"] = True
            return False
        lrs.append(lr)
        losses.append(loss)
        s = smooth(losses)[-1]
        state["best"] = min(state["best"], s)
        state["diverged"] = s > 4 * state["best"]
        return len(lrs) < steps and not state["diverged"]

    epoch = 0
    while len(lrs) < steps and not state["diverged"]:  # as many passes over the training side as the sweep needs
        before = len(lrs)
        train_steps(t, inputs.train, epoch, progress=False, on_step=on_step)
        epoch += 1
        if len(lrs) == before:
            break
    return pd.DataFrame({"weight_decay": wd, "step": np.arange(len(lrs)), "lr": lrs, "loss": losses, "smoothed": smooth(losses) if losses else []})


def plot(path: Path, backbone: str, curves: pd.DataFrame, picks: dict[float, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for wd, c in curves.groupby("weight_decay", sort=True):
        line = ax.plot(c["lr"], c["smoothed"], label=f"weight decay {wd:g}")[0]
        ax.plot(c["lr"], c["loss"], color=line.get_color(), alpha=0.25, lw=0.8)
        lr = picks[wd]
        ax.axvline(lr, color=line.get_color(), ls="--", lw=1)
        ax.annotate(f"{lr:.2g}", (lr, c["smoothed"].min()), textcoords="offset points", xytext=(4, 4), fontsize=8, color=line.get_color())
    ax.set_xscale("log")
    top = float(curves["smoothed"].iloc[: max(1, len(curves) // 10)].max())
    ax.set_ylim(max(0.0, float(curves["smoothed"].min()) * 0.8), top * 1.6 if np.isfinite(top) and top > 0 else None)
    ax.set(xlabel="learning rate", ylabel="training loss (smoothed; raw faint)", title=f"{backbone} — learning-rate range test (dashed: steepest descent)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)


def lr_find(backbone: str, params: Params, root: Path, out_dir: Path, wds: list[float], steps: int, start: float, end: float, log=print) -> dict:
    from hcd.stages.train import fold_stats, load_inputs

    _, cfg = params.for_backbone(backbone)
    set_threads()
    device = pick_device()
    x = open_packed(root / PACKED / "train_x.npy")
    idx, sides = read_split(root / PACKED / "train_index.csv", root / SPLIT / "split.csv", n_rows=len(x))
    masks = held_out(sides, root / SPLIT / "split.csv")
    stats = fold_stats(root / STATS, len(masks))[0]
    inputs = load_inputs(backbone, cfg, x, idx, masks[0], stats, root / SPLIT / "split.csv", device)
    curves = pd.concat([range_test(backbone, params, wd, inputs, steps, start, end, device) for wd in wds], ignore_index=True)
    picks = {wd: steepest(c["lr"].to_numpy(), c["smoothed"].to_numpy()) for wd, c in curves.groupby("weight_decay", sort=True)}
    best_wd = min(picks, key=lambda wd: float(curves[curves["weight_decay"] == wd]["smoothed"].min()))
    result = {"backbone": backbone, "method": "steepest descent of the smoothed loss", "suggested_lr": picks[best_wd], "weight_decay": best_wd, "per_weight_decay": {f"{wd:g}": lr for wd, lr in picks.items()}, "steps": int(len(curves))}
    with Commit() as commit:
        commit.csv(out_dir / f"{backbone}.csv", curves)
        commit.json(out_dir / f"{backbone}.json", result)
        plot(commit.path(out_dir / f"{backbone}.png"), backbone, curves, picks)
    # one backbone: the shared keys; several: its own entry (`++` sets a key params.yaml does not hold yet)
    lr_key, wd_key = ("lr", "train.weight_decay") if params.backbones == [backbone] else (f"++models.{backbone}.lr", f"++models.{backbone}.weight_decay")
    flags = f"-S {lr_key}={picks[best_wd]:.2g}" + (f" -S {wd_key}={best_wd:g}" if len(wds) > 1 else "")
    log(f"lr-find {backbone}: suggested lr {picks[best_wd]:.2g} (steepest descent of the smoothed loss" + (f", weight decay {best_wd:g}" if len(wds) > 1 else "") + f"); curves in {out_dir}/{backbone}.png")
    log(f"lr-find {backbone}: to use it: dvc exp run {flags}")
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="hcd lr-find", description=__doc__.splitlines()[0].split(": ", 1)[1])
    ap.add_argument("backbone", nargs="?", help="a name in params.yaml's backbones (or --all)")
    ap.add_argument("--all", action="store_true", help="every backbone of params.yaml, one after another")
    ap.add_argument("--steps", type=int, default=200, help="steps of the sweep (default 200)")
    ap.add_argument("--start", type=float, default=1e-7, help="first lr (default 1e-7)")
    ap.add_argument("--end", type=float, default=1.0, help="last lr (default 1)")
    ap.add_argument("--weight-decays", default=None, help="comma-separated weight decays to sweep (default: train.weight_decay)")
    ap.add_argument("--out-dir", default="lr-find", help="where the plot, curve and suggestion go (default: lr-find)")
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    if args.all == bool(args.backbone):
        raise HcdError("lr-find: name one backbone, or --all")
    names = params.backbones if args.all else [args.backbone]
    for b in names:
        if b not in params.backbones:
            raise HcdError(f"backbones: {b!r} is not in {params.backbones}")
    if not (0 < args.start < args.end) or args.steps < 10:
        raise HcdError(f"lr-find: need 0 < --start < --end and --steps >= 10 (got {args.start:g}, {args.end:g}, {args.steps})")
    try:
        wds = [float(w) for w in args.weight_decays.split(",")] if args.weight_decays else None
    except ValueError:
        raise HcdError(f"--weight-decays: not a comma-separated list of numbers: {args.weight_decays[:60]!r}") from None
    root = Path(args.params).resolve().parent
    for b in names:
        lr_find(b, params, root, Path(args.out_dir), wds or [params.for_backbone(b)[1].weight_decay], args.steps, args.start, args.end, log=lambda m: print(m, file=sys.stderr))
