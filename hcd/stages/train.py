"""Stage ``train`` (one per backbone): fit a classifier on the training side of the split.

Reads the packed array batch-wise, normalises with the ``stats`` stage, augments
on the model's device, and keeps the epoch with the best validation AUC (early
stopping after ``train.patience`` epochs without improvement). Per epoch, train
loss, validation loss and validation AUC go to dvclive (``dvclive/<backbone>/``),
so ``dvc plots show`` draws the curves and ``dvc exp show`` tabulates them.

Device: CUDA (bf16 autocast, or fp16 with a grad scaler; channels_last) →
Apple MPS → CPU. On the CPU, fp32 with deterministic algorithms and seeded
generators: two runs with the same params give bit-identical weights.

Writes ``models/<backbone>/model.safetensors`` (weights only: loading runs no
code) and ``model.json`` (architecture, preprocessing, best epoch, history).

After every epoch but the last, ``models/<backbone>/checkpoint.pt`` holds the
full training state (:mod:`hcd.checkpoint`); a killed run restarted with the
same params, data and code resumes there and ends bit-identical (CPU) to an
uninterrupted one. A NaN/inf loss stops training with the epoch, step and
learning rate and keeps the last good checkpoint; CUDA out-of-memory names the
batch size and a smaller one to try. The model files are written only at the end.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from sklearn.metrics import roc_auc_score

from hcd import env
from hcd.atomic import Commit, clean_stale_temps, read_json
from hcd.data.augment import AugmentConfig
from hcd.data.batches import PackedBatches, Preprocess
from hcd.data.packed import held_out, open_packed, read_split
from hcd.digests import file_sha256
from hcd.errors import HcdError
from hcd.model import checkpoint
from hcd.model.factory import build_model, classifier_params
from hcd.model.inference import predict_probs
from hcd.model.weights import save_model
from hcd.pipeline.params import Params, TrainParams, load_params
from hcd.runtime import distributed
from hcd.runtime.device import autocast_dtype, oom_message, pick_device, set_threads
from hcd.runtime.loop import Trainer, train_steps
from hcd.runtime.optim import make_optimizer, make_schedule
from hcd.runtime.seeding import seed_everything


@dataclass
class Inputs:
    """The training and validation sides of the packed array, and how the model sees a patch."""

    train: PackedBatches
    val: PackedBatches
    y_train: np.ndarray
    y_val: np.ndarray
    prep: Preprocess


@dataclass
class Progress:
    """What a checkpoint carries besides the optimizer: the best epoch so far, the history, early stopping."""

    best: dict
    history: list[dict]
    bad_epochs: int = 0
    start: int = 0  # epochs already done
    stopped: bool = False


def load_inputs(backbone: str, cfg: TrainParams, x: np.ndarray, idx, held: np.ndarray, st: dict, split: Path, device: torch.device) -> Inputs:
    """The patches one model trains on (``~held``) and is judged on (``held``), with the stats of its training side."""
    prep = Preprocess(cfg.crop, cfg.upscale, tuple(st["mean"]), tuple(st["std"]))
    is_train = ~held
    labels = idx["label"].to_numpy()
    check_sides(backbone, cfg, labels[is_train], labels[~is_train], split)
    rows = idx["row"].to_numpy()
    train_src = PackedBatches(x, rows[is_train], labels[is_train], device=device)
    val_src = PackedBatches(x, rows[~is_train], labels[~is_train], device=device)
    return Inputs(train_src, val_src, labels[is_train], labels[~is_train], prep)


def check_sides(backbone: str, cfg: TrainParams, y_train: np.ndarray, y_val: np.ndarray, split: Path) -> None:
    """Refuse, before anything is trained or written, data a model cannot honestly learn or be judged on."""
    key = f"models.{backbone}.batch_size (or train.batch_size)"
    if len(y_train) < cfg.batch_size:
        raise HcdError(f"train {backbone}: batch size {cfg.batch_size} is larger than the {len(y_train)} training patches, so no step would be taken; set {key} to {max(2, len(y_train))} or lower")
    for side, y in (("training", y_train), ("validation", y_val)):
        counts = np.bincount(y.astype(np.int64), minlength=2)
        if len(y) == 0 or counts.min() == 0:
            raise HcdError(f"{split}: the {side} side holds {counts[0]} negative and {counts[1]} positive patches; both classes are needed (rerun split with other split.* params)")


def build_trainer(backbone: str, cfg: TrainParams, lr: float, seed: int, inputs: Inputs, device: torch.device, ranks: distributed.Ranks = distributed.Ranks()) -> Trainer:
    model = build_model(backbone, cfg.pretrained)
    if ranks.on and cfg.sync_bn and device.type == "cuda":  # SyncBatchNorm needs a GPU
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    fwd = model
    if ranks.on:  # gradients averaged across ranks in backward; every rank starts from rank 0's weights
        fwd = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    fwd = torch.compile(fwd) if cfg.compile and device.type == "cuda" else fwd
    opt = make_optimizer(model, cfg, lr)
    sched = make_schedule(opt, cfg, lr, max(1, len(inputs.train) // cfg.batch_size))
    scaler = torch.amp.GradScaler("cuda", enabled=autocast_dtype(device) == torch.float16)
    pos = float(inputs.y_train.mean())
    pos_weight = None
    if cfg.pos_weight == "auto":
        pos_weight = torch.tensor((1 - pos) / pos, device=device)
    elif cfg.pos_weight is not None:
        pos_weight = torch.tensor(float(cfg.pos_weight), device=device)
    aug = AugmentConfig(**cfg.augment.model_dump())
    gen_order = torch.Generator().manual_seed(seed)  # the same on every rank: they shard one order
    gen_aug = torch.Generator().manual_seed(seed + 1 + 7919 * ranks.rank)  # each rank augments its slice with its own draws
    return Trainer(model, fwd, opt, sched, inputs.prep, aug, gen_order, gen_aug, cfg.batch_size, device, backbone, cfg.epochs, scaler, pos_weight, ranks)


def resume(t: Trainer, ckpt_path: Path, key: str, log, name: str | None = None) -> Progress:
    """The progress of a checkpoint of this very run (same key), with every state restored; else a fresh start."""
    fresh = Progress(best={"auc": float("nan"), "score": -math.inf, "epoch": -1, "state": None}, history=[])
    state = checkpoint.load(ckpt_path, key, log)
    if state is None:
        return fresh
    t.model.load_state_dict(state["model"])
    t.opt.load_state_dict(state["optimizer"])
    t.sched.load_state_dict(state["scheduler"])
    t.scaler.load_state_dict(state["scaler"])
    checkpoint.set_rng_state(state["rng"] if not t.ranks.on else state["rng_ranks"][t.ranks.rank], t.gen_order, t.gen_aug)
    log(f"train {name or t.name}: resuming after epoch {state['epoch']} from {ckpt_path}")
    return Progress(state["best"], state["history"], state["bad_epochs"], state["epoch"], state["stopped"])


def run_epoch(t: Trainer, inputs: Inputs, epoch: int, max_steps: int | None, ckpt_path: Path) -> dict:
    """Train one epoch, then score the validation side: the epoch's record."""
    try:
        total, seen = train_steps(t, inputs.train, epoch, max_steps=max_steps)
        if seen == 0:  # never write a model that took no step
            raise HcdError(f"train {t.name}: epoch {epoch + 1} took no training step ({len(inputs.train)} patches, batch size {t.batch_size}); model not written")
        p_val = predict_probs(t.model, inputs.val, inputs.prep, t.device, max(t.batch_size, 256))  # every rank, the whole side
    except torch.OutOfMemoryError:
        raise HcdError(oom_message(f"train {t.name}", t.device, t.batch_size, f"models.{t.name}.batch_size (or train.batch_size)")) from None
    except HcdError as err:
        if ckpt_path.exists():
            raise HcdError(f"{err}; the last good checkpoint (epoch {epoch}) is kept: {ckpt_path}") from None
        raise
    val_loss = float(F.binary_cross_entropy(torch.from_numpy(p_val).double().clamp(1e-7, 1 - 1e-7), torch.from_numpy(inputs.y_val).double()))
    auc = float(roc_auc_score(inputs.y_val, p_val))  # both classes on the validation side: check_sides
    return {"epoch": epoch + 1, "train_loss": total / max(1, seen), "val_loss": val_loss, "val_auc": auc, "lr": t.opt.param_groups[0]["lr"]}


def update_best(t: Trainer, prog: Progress, rec: dict, patience: int, log) -> None:
    """Keep the weights of the epoch with the best validation AUC; stop after ``patience`` epochs without one."""
    if prog.best["state"] is None or rec["val_auc"] > prog.best["score"]:
        prog.best = {"auc": rec["val_auc"], "score": rec["val_auc"], "epoch": rec["epoch"], "state": {k: v.detach().to("cpu", copy=True) for k, v in t.model.state_dict().items()}}
        prog.bad_epochs = 0
        return
    prog.bad_epochs += 1
    if patience and prog.bad_epochs >= patience:
        log(f"train {t.name}: no better validation AUC for {patience} epochs; stopping")
        prog.stopped = True


def save_checkpoint(t: Trainer, prog: Progress, ckpt_path: Path, key: str, epochs_done: int) -> None:
    """Called on every rank (they hand rank 0 their generator states); rank 0 writes."""
    rng = checkpoint.rng_state(t.gen_order, t.gen_aug)
    per_rank = distributed.gather(rng) if t.ranks.on else None
    if not t.ranks.main:
        return
    state = {"key": key, "epoch": epochs_done, "model": t.model.state_dict(), "optimizer": t.opt.state_dict(), "scheduler": t.sched.state_dict(), "scaler": t.scaler.state_dict()}
    state |= {"rng": rng, "best": prog.best, "history": prog.history, "bad_epochs": prog.bad_epochs, "stopped": prog.stopped}
    if per_rank is not None:
        state["rng_ranks"] = per_rank
    checkpoint.save(ckpt_path, state)


def checkpoint_path(out_dir: Path, fold: int, folds: int) -> Path:
    """``checkpoint.pt`` with one split; ``checkpoint-fold<k>.pt`` per fold with ``split.folds: K``."""
    return out_dir / (checkpoint.NAME if folds == 1 else checkpoint.NAME.replace(".pt", f"-fold{fold}.pt"))


def fit_fold(t: Trainer, inputs: Inputs, cfg: TrainParams, fold: int, folds: int, key: str, out_dir: Path, live, log) -> Progress:
    """Train one model (the only one, or fold ``fold`` of ``folds``), resuming its checkpoint; log its curves."""
    if not t.ranks.main:
        log = _quiet  # rank 0 speaks for all
    tag, name = (f"fold{fold}/", f"{t.name} fold {fold}") if folds > 1 else ("", t.name)
    head = set(map(id, classifier_params(t.model)))
    ckpt_path = checkpoint_path(out_dir, fold, folds)
    fold_key = key if folds == 1 else checkpoint.sub_key(key, f"fold {fold} of {folds}")
    prog = resume(t, ckpt_path, fold_key, log, name)
    already_done = prog.stopped or prog.start >= cfg.epochs
    log(f"train {name}: {len(inputs.train)} train / {len(inputs.val)} val patches, {t.device.type}, lr {t.opt.defaults['lr']:g}, {cfg.epochs} epochs, crop {cfg.crop}" + (f" -> {cfg.upscale}" if cfg.upscale else ""))
    t_start = time.perf_counter()
    for rec in prog.history:  # a resumed run rewrites the curves of the epochs before the kill
        _log_epoch(live, rec, tag)
    for epoch in range(prog.start, cfg.epochs):
        if prog.stopped:
            break
        frozen = epoch < cfg.freeze_epochs and bool(head)
        for p in t.model.parameters():
            p.requires_grad_(not frozen or id(p) in head)
        rec = run_epoch(t, inputs, epoch, cfg.max_steps, ckpt_path)
        prog.history.append(rec)
        _log_epoch(live, rec, tag)
        log(f"train {name}: epoch {epoch + 1}: train loss {rec['train_loss']:.4f}, val loss {rec['val_loss']:.4f}, val AUC {rec['val_auc']:.4f}")
        update_best(t, prog, rec, cfg.patience, log)
        if epoch + 1 < cfg.epochs and not prog.stopped:  # after the last epoch, model.safetensors is written instead
            save_checkpoint(t, prog, ckpt_path, fold_key, epoch + 1)
    if folds > 1 and not already_done:  # a finished fold is kept until every fold is: a kill in a later fold does not redo it
        prog.stopped = True
        save_checkpoint(t, prog, ckpt_path, fold_key, len(prog.history))
    live.summary[f"{tag}best/val_auc"] = prog.best["auc"]
    live.summary[f"{tag}best/epoch"] = prog.best["epoch"]
    log(f"train {name}: best val AUC {prog.best['auc']:.4f} at epoch {prog.best['epoch']}; {time.perf_counter() - t_start:.0f} s")
    return prog


def fold_stats(stats: Path, folds: int) -> list[dict]:
    """The normalisation of each fold's model, from its own training side (``stats`` stage)."""
    st = read_json(stats)
    per = st.get("folds") if isinstance(st, dict) else None
    if (folds == 1) != (per is None) or (per is not None and len(per) != folds):
        have = len(per) if per is not None else 1
        raise HcdError(f"{stats}: statistics for {have} fold(s), but the split has {folds} (rerun stats)")
    return per if per is not None else [st]


def train(backbone: str, params: Params, packed: Path, index: Path, split: Path, stats: Path, out_dir: Path, live_dir: Path, log=print) -> dict:
    lr, cfg = params.for_backbone(backbone)
    seed = params.seed
    max_steps = cfg.max_steps  # smoke runs and benchmarks: a declared param, recorded in model.json
    seed_everything(seed, cfg.deterministic)
    ranks = distributed.current()
    if ranks.on and cfg.batch_size % ranks.world:
        raise HcdError(f"train {backbone}: batch size {cfg.batch_size} does not split into {ranks.world} equal shares (train.processes); set train.batch_size to a multiple of {ranks.world}")
    threads = set_threads(ranks.world)
    device = distributed.start(ranks, pick_device())
    x = open_packed(packed)
    idx, sides = read_split(index, split, n_rows=len(x))
    masks = held_out(sides, split)
    folds = len(masks)
    # every fold's data checked before any fold trains
    inputs = [load_inputs(backbone, cfg, x, idx, held, st, split, device) for held, st in zip(masks, fold_stats(stats, folds))]

    from dvclive import Live

    settings = {"backbone": backbone, "lr": lr, "train": cfg.model_dump(mode="json"), "seed": seed, "device": checkpoint.device_identity(device), "threads": threads, "max_steps": max_steps}
    key = checkpoint.run_key(settings, packed, [index, split, stats, *local_weights(cfg)])  # a weights file replaced in place never resumes
    log(f"train {backbone}: {device.type}, {threads} threads" + (f", {folds} folds" if folds > 1 else "") + (f", {ranks.world} data-parallel processes" if ranks.on and ranks.main else ""))
    try:
        if not ranks.main:  # the others train in step with rank 0 and write nothing
            fit_all(backbone, cfg, lr, seed, inputs, device, ranks, key, out_dir, _NoLive(), _quiet)
            return {}
        with Commit() as commit:  # curves and model files appear together, only when training has finished
            curves = commit.dir(live_dir)
            with Live(str(curves), save_dvc_exp=False, dvcyaml=None, report=None) as live:
                runs = fit_all(backbone, cfg, lr, seed, inputs, device, ranks, key, out_dir, live, log)
            (curves / "dvc.yaml").write_text(curve_plots(backbone, folds))
            meta = model_meta(backbone, cfg, lr, seed, device, runs)
            state = runs[0][1].best["state"] if folds == 1 else {f"fold{i}.{k}": v for i, (_, prog) in enumerate(runs) for k, v in prog.best["state"].items()}
            save_model(out_dir, state, meta, commit)
        for fold in range(folds):  # the run is complete; a rerun starts afresh
            checkpoint_path(out_dir, fold, folds).unlink(missing_ok=True)
        return meta
    finally:
        distributed.finish()


def fit_all(backbone: str, cfg: TrainParams, lr: float, seed: int, inputs: list[Inputs], device: torch.device, ranks: distributed.Ranks, key: str, out_dir: Path, live, log) -> list[tuple[Inputs, Progress]]:
    """Every fold's model in turn (one without folds); with several ranks, checked identical on all of them."""
    folds = len(inputs)
    runs: list[tuple[Inputs, Progress]] = []
    for fold, inp in enumerate(inputs):
        if fold:
            seed_everything(seed, cfg.deterministic)  # each fold starts from the same initial weights and generators
        t = build_trainer(backbone, cfg, lr, seed, inp, device, ranks)
        runs.append((inp, fit_fold(t, inp, cfg, fold, folds, key, out_dir, live, log)))
        if ranks.on:
            n = distributed.check_same_weights(runs[-1][1].best["state"], f"train {backbone}")
            log(f"train {backbone}: all {n} ranks hold identical weights" + (f" (fold {fold})" if folds > 1 else ""))
    if folds > 1:
        live.summary["best/val_auc_mean"] = float(np.mean([prog.best["auc"] for _, prog in runs]))
    return runs


class _NoLive:
    """What ranks other than 0 log to: nothing (rank 0 writes the curves)."""

    def __init__(self) -> None:
        self.summary: dict = {}
        self.step = 0

    def log_metric(self, *args, **kwargs) -> None:
        pass

    def next_step(self) -> None:
        pass


def _quiet(message: str) -> None:
    pass


def model_meta(backbone: str, cfg: TrainParams, lr: float, seed: int, device: torch.device, runs: list[tuple[Inputs, Progress]]) -> dict:
    """``model.json``: deterministic (no wall times), so reruns and both engines give identical files."""
    per = [
        {"mean": list(inp.prep.mean), "std": list(inp.prep.std), "best_epoch": prog.best["epoch"], "best_val_auc": prog.best["auc"], "epochs_run": len(prog.history)}
        for inp, prog in runs
    ]
    head: dict = {"backbone": backbone, "crop": cfg.crop, "upscale": cfg.upscale}
    if len(runs) == 1:
        head |= per[0]
    else:
        head |= {"folds": len(runs), "fold_models": [{"fold": i, **rec, "history": prog.history} for i, (rec, (_, prog)) in enumerate(zip(per, runs))]}
    head |= {
        "device": device.type,
        "lr": lr,
        "train": cfg.model_dump(mode="json", exclude=_defaults_left_out(cfg)),  # a plain run's file stays as before these keys existed
        "seed": seed,
    }
    if len(runs) == 1:
        head["history"] = runs[0][1].history
    for weights in local_weights(cfg):  # the path is a param; its content is not: record what this run started from
        head["pretrained_sha256"] = file_sha256(weights)
    head["environment"] = env.environment() | checkpoint.device_identity(device)  # what the weights came from
    return head


def local_weights(cfg: TrainParams) -> list[Path]:
    """The local pretrained weights file (``train.pretrained: <path>``), if any: an input neither engine tracks by content."""
    return [Path(cfg.pretrained)] if isinstance(cfg.pretrained, str) else []


def _defaults_left_out(cfg: TrainParams) -> set[str]:
    """Keys added later, left out of model.json at their defaults, so earlier runs' files stay byte-identical."""
    out = set()
    if not cfg.max_steps:
        out.add("max_steps")
    if cfg.processes == 1:
        out |= {"processes", "sync_bn"}
    if cfg.deterministic:
        out.add("deterministic")
    return out


CURVES = (("train/loss", "training loss", "loss (BCE)"), ("val/loss", "validation loss", "loss (BCE)"), ("val/auc", "validation AUC", "AUC"))


def curve_plots(backbone: str, folds: int) -> str:
    """``dvclive/<backbone>/dvc.yaml``: how ``dvc plots show`` draws this run's curves, one chart per curve titled
    with the backbone and what it shows, against the epoch; with folds a line per fold in each chart. Written by
    the run because only the run knows its folds (DVC forbids a dvc.yaml as a declared output)."""
    tags = [f"fold{k}/" for k in range(folds)] if folds > 1 else [""]
    charts = []
    for metric, what, unit in CURVES:
        title = f"{backbone} — {what}" + (f", one line per fold ({folds})" if folds > 1 else "")
        files = {f"plots/metrics/{tag}{metric}.tsv": metric.rsplit("/", 1)[1] for tag in tags}
        charts.append({title: {"x": "step", "y": files, "x_label": "epoch", "y_label": unit}})
    return "# written by the train stage (hcd/stages/train.py): the charts of `dvc plots show`\n" + yaml.safe_dump({"plots": charts}, sort_keys=False, allow_unicode=True)


def _log_epoch(live, rec: dict, tag: str = "") -> None:
    live.step = rec["epoch"]  # the curves' x axis is the epoch, from 1 (each fold's from 1 again)
    live.log_metric(f"{tag}train/loss", rec["train_loss"])
    live.log_metric(f"{tag}val/loss", rec["val_loss"])
    live.log_metric(f"{tag}val/auc", rec["val_auc"])
    live.next_step()


def gpus_needed(argv: list[str]) -> int:
    """GPUs this train command takes (``train.processes`` of its backbone), claimed before CUDA starts (hcd.cli).
    1 when the command line or params are bad: the stage itself then says what is wrong."""
    try:
        args = _parser().parse_known_args(argv)[0]
        return load_params(args.params).for_backbone(args.backbone)[1].processes
    except (HcdError, SystemExit, OSError, ValueError, KeyError):
        return 1


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hcd train", description=__doc__.splitlines()[0])
    ap.add_argument("backbone", help="a name in params.yaml's backbones")
    ap.add_argument("--packed", required=True, help="packed training patches (data/packed/train_x.npy)")
    ap.add_argument("--index", required=True, help="their index (data/packed/train_index.csv)")
    ap.add_argument("--split", required=True, help="train/validation sides (data/split/split.csv)")
    ap.add_argument("--stats", required=True, help="channel statistics for normalisation (data/stats/stats.json)")
    ap.add_argument("--out-dir", required=True, help="model.safetensors, model.json and the checkpoint (models/<backbone>)")
    ap.add_argument("--live-dir", required=True, help="dvclive curves (dvclive/<backbone>)")
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml; reads seed, lr, train.*, models.*)")
    return ap


def main(argv: list[str] | None = None) -> None:
    if distributed.under_torchrun():
        distributed.die_with_launcher()
    args = _parser().parse_args(argv)
    params = load_params(args.params)
    if args.backbone not in params.backbones:
        raise HcdError(f"backbones: {args.backbone!r} is not in {params.backbones}")
    out, live = Path(args.out_dir), Path(args.live_dir)
    processes = params.for_backbone(args.backbone)[1].processes
    if processes > 1 and not distributed.under_torchrun():  # the stage starts itself again as `processes` ranks
        clean_stale_temps(out / "model.safetensors", out / "model.json", live)
        distributed.launch(processes, ["train", *(sys.argv[1:] if argv is None else argv)], f"train {args.backbone}")
        return
    if distributed.current().main:
        clean_stale_temps(out / "model.safetensors", out / "model.json", live, *out.glob("checkpoint*.pt"))
    train(args.backbone, params, Path(args.packed), Path(args.index), Path(args.split), Path(args.stats), out, live, log=lambda m: print(m, file=sys.stderr))
