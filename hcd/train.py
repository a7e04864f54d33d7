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
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from hcd import checkpoint, env
from hcd.augment import AugmentConfig
from hcd.data import PackedBatches, Preprocess, autocast_dtype, pick_device, set_threads
from hcd.errors import HcdError
from hcd.io import Commit, clean_stale_temps, read_json
from hcd.models import build_model, classifier_params, read_model_meta
from hcd.packed import open_packed
from hcd.params import Params, TrainParams, load_params



def train_steps(
    model: torch.nn.Module,
    fwd: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    source: PackedBatches,
    prep: Preprocess,
    aug: AugmentConfig,
    gen_order: torch.Generator,
    gen_aug: torch.Generator,
    batch_size: int,
    device: torch.device,
    name: str,
    epoch: int,
    scaler: torch.amp.GradScaler | None = None,
    pos_weight: torch.Tensor | None = None,
    epochs: int = 1,
    max_steps: int | None = None,
    progress: bool = True,
) -> tuple[float, int]:
    """One epoch (or ``max_steps`` steps) of the hot loop; returns (summed loss, patches seen).

    Per step: one gather from the packed array (or the GPU-resident copy), batched
    augmentation and normalisation on the device, autocast forward, backward, step.
    The loss is read back once per epoch, not per step, so the GPU is never waited on.
    """
    from tqdm import tqdm

    dtype = autocast_dtype(device)
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    channels_last = device.type == "cuda"
    model.train()
    n_steps = len(source) // batch_size
    if max_steps is not None:
        n_steps = min(n_steps, max_steps)
    losses = torch.zeros((), device=device, dtype=torch.float64)
    seen = 0
    bar = tqdm(total=n_steps * batch_size, unit="patch", unit_scale=True, desc=f"{name} epoch {epoch + 1}/{epochs}", file=sys.stderr, mininterval=2.0, disable=None if progress else True)
    for step, (xb, yb) in enumerate(source.batches(batch_size, gen_order, drop_last=True)):
        if step >= n_steps:
            break
        xin = prep(xb, device, aug, gen_aug, channels_last)
        y = yb.to(device, non_blocking=True).view(-1, 1)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logit = fwd(xin).float()
        loss = F.binary_cross_entropy_with_logits(logit, y, pos_weight=pos_weight)
        if device.type == "cpu" or step % 50 == 0:  # on a GPU, check without a sync every step
            if not torch.isfinite(loss):
                cur = opt.param_groups[0]["lr"]
                raise HcdError(f"train {name}: loss is {loss.item()} at epoch {epoch + 1}, step {step + 1}, lr {cur:.3g} — lower lr or check the data; model not written")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        losses += loss.detach().double() * len(y)
        seen += len(y)
        bar.update(len(y))
    bar.close()
    total = float(losses)
    if not math.isfinite(total):
        raise HcdError(f"train {name}: loss became non-finite during epoch {epoch + 1} (lr {opt.param_groups[0]['lr']:.3g}) — lower lr or check the data; model not written")
    return total, seen


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = False


def make_optimizer(model: torch.nn.Module, cfg: TrainParams, lr: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)  # no weight decay on biases and norms
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=lr)


def make_schedule(opt: torch.optim.Optimizer, cfg: TrainParams, lr: float, steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.schedule == "onecycle" and total >= 4:  # each phase needs two steps or more (torch divides by its length)
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=max(0.25, 2 / total), div_factor=25.0, final_div_factor=1e3)
    if cfg.schedule == "cosine":
        warm = int(cfg.warmup_epochs * steps_per_epoch)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            t = (step - warm) / max(1, total - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

        return torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


@torch.no_grad()
def predict_logits(model: torch.nn.Module, source: PackedBatches, prep: Preprocess, device: torch.device, batch_size: int, n_views: int = 1) -> np.ndarray:
    """Mean probability over ``n_views`` dihedral views per patch; all views of a batch in one forward."""
    from hcd.augment import tta_views

    model.eval()
    dtype = autocast_dtype(device)
    out = []
    for xb, _ in source.batches(batch_size):
        x = prep(xb, device, channels_last=device.type == "cuda")
        b = x.shape[0]
        views = tta_views(x, n_views) if n_views > 1 else x  # (V*B, C, H, W): one forward for every view
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(views).float().view(n_views, b)
        out.append(torch.sigmoid(logits).mean(0).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")


def train(backbone: str, params: Params, packed: Path, index: Path, split: Path, stats: Path, out_dir: Path, live_dir: Path, log=print) -> dict:
    lr, cfg = params.for_backbone(backbone)
    seed = params.seed
    max_steps = env.max_steps()  # benchmarks and smoke runs
    seed_everything(seed)
    threads = set_threads()
    device = pick_device()
    x = open_packed(packed)
    idx = pd.read_csv(index, dtype={"id": str})
    sides = pd.read_csv(split, dtype={"id": str})
    if len(idx) != len(x) or not (sides["id"].to_numpy() == idx["id"].to_numpy()).all():
        raise HcdError(f"{split}: does not match {index} (rerun split)")
    st = read_json(stats)
    prep = Preprocess(cfg.crop, cfg.upscale, tuple(st["mean"]), tuple(st["std"]))
    is_train = (sides["side"] == "train").to_numpy()
    labels = idx["label"].to_numpy()
    train_src = PackedBatches(x, idx["row"].to_numpy()[is_train], labels[is_train], device=device)
    val_src = PackedBatches(x, idx["row"].to_numpy()[~is_train], labels[~is_train], device=device)
    y_val = labels[~is_train]
    check_sides(backbone, cfg, labels[is_train], y_val, split)

    model = build_model(backbone, cfg.pretrained).to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    fwd = torch.compile(model) if cfg.compile and device.type == "cuda" else model
    opt = make_optimizer(model, cfg, lr)
    steps = max(1, len(train_src) // cfg.batch_size)
    sched = make_schedule(opt, cfg, lr, steps)
    dtype = autocast_dtype(device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    pos = float(labels[is_train].mean())
    pos_weight = None
    if cfg.pos_weight == "auto":
        pos_weight = torch.tensor((1 - pos) / pos, device=device)
    elif cfg.pos_weight is not None:
        pos_weight = torch.tensor(float(cfg.pos_weight), device=device)
    aug = AugmentConfig(**cfg.augment.model_dump())
    gen_order = torch.Generator().manual_seed(seed)
    gen_aug = torch.Generator().manual_seed(seed + 1)
    head = set(map(id, classifier_params(model)))

    from dvclive import Live

    ckpt_path = out_dir / checkpoint.NAME
    settings = {"backbone": backbone, "lr": lr, "train": cfg.model_dump(mode="json"), "seed": seed, "device": checkpoint.device_identity(device), "threads": threads, "max_steps": max_steps}
    key = checkpoint.run_key(settings, packed, [index, split, stats])
    best = {"auc": float("nan"), "score": -math.inf, "epoch": -1, "state": None}
    history: list[dict] = []
    bad_epochs, start, stopped = 0, 0, False
    resumed = checkpoint.load(ckpt_path, key, log)
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        opt.load_state_dict(resumed["optimizer"])
        sched.load_state_dict(resumed["scheduler"])
        scaler.load_state_dict(resumed["scaler"])
        checkpoint.set_rng_state(resumed["rng"], gen_order, gen_aug)
        best, history, bad_epochs, start, stopped = resumed["best"], resumed["history"], resumed["bad_epochs"], resumed["epoch"], resumed["stopped"]
        log(f"train {backbone}: resuming after epoch {start} from {ckpt_path}")
    log(f"train {backbone}: {len(train_src)} train / {len(val_src)} val patches, {device.type}, {threads} threads, lr {lr:g}, {cfg.epochs} epochs, crop {cfg.crop}" + (f" -> {cfg.upscale}" if cfg.upscale else ""))
    t_start = time.perf_counter()
    with Commit() as commit:  # curves and model files appear together, only when training has finished
        with Live(str(commit.dir(live_dir)), save_dvc_exp=False, dvcyaml=None, report=None) as live:
            for rec in history:  # a resumed run rewrites the curves of the epochs before the kill
                _log_epoch(live, rec)
            for epoch in range(start, cfg.epochs):
                if stopped:
                    break
                frozen = epoch < cfg.freeze_epochs and bool(head)
                for p in model.parameters():
                    p.requires_grad_(not frozen or id(p) in head)
                try:
                    total, seen = train_steps(model, fwd, opt, sched, train_src, prep, aug, gen_order, gen_aug, cfg.batch_size, device, backbone, epoch, scaler=scaler, pos_weight=pos_weight, epochs=cfg.epochs, max_steps=max_steps)
                    if seen == 0:  # never write a model that took no step
                        raise HcdError(f"train {backbone}: epoch {epoch + 1} took no training step ({len(train_src)} patches, batch size {cfg.batch_size}); model not written")
                    p_val = predict_logits(fwd, val_src, prep, device, max(cfg.batch_size, 256))
                except torch.OutOfMemoryError:
                    raise HcdError(oom_message(f"train {backbone}", device, cfg.batch_size, f"models.{backbone}.batch_size (or train.batch_size)")) from None
                except HcdError as err:
                    if ckpt_path.exists():
                        raise HcdError(f"{err}; the last good checkpoint (epoch {epoch}) is kept: {ckpt_path}") from None
                    raise
                val_loss = float(F.binary_cross_entropy(torch.from_numpy(p_val).double().clamp(1e-7, 1 - 1e-7), torch.from_numpy(y_val).double()))
                auc = _auc(y_val, p_val)
                rec = {"epoch": epoch + 1, "train_loss": total / max(1, seen), "val_loss": val_loss, "val_auc": auc, "lr": opt.param_groups[0]["lr"]}
                history.append(rec)
                _log_epoch(live, rec)
                log(f"train {backbone}: epoch {epoch + 1}: train loss {rec['train_loss']:.4f}, val loss {val_loss:.4f}, val AUC {auc:.4f}")
                score = auc  # both classes on the validation side: check_sides
                if best["state"] is None or score > best["score"]:
                    best = {"auc": auc, "score": score, "epoch": epoch + 1, "state": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}}
                    bad_epochs = 0
                else:
                    bad_epochs += 1
                    if cfg.patience and bad_epochs >= cfg.patience:
                        log(f"train {backbone}: no better validation AUC for {cfg.patience} epochs; stopping")
                        stopped = True
                if epoch + 1 < cfg.epochs and not stopped:  # after the last epoch, model.safetensors is written instead
                    state = {"key": key, "epoch": epoch + 1, "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict()}
                    state |= {"rng": checkpoint.rng_state(gen_order, gen_aug), "best": best, "history": history, "bad_epochs": bad_epochs, "stopped": stopped}
                    checkpoint.save(ckpt_path, state)
            live.summary["best/val_auc"] = best["auc"]
            live.summary["best/epoch"] = best["epoch"]
        log(f"train {backbone}: best val AUC {best['auc']:.4f} at epoch {best['epoch']}; {time.perf_counter() - t_start:.0f} s")
        meta = {  # deterministic: no wall times, so reruns and both engines give identical files
            "backbone": backbone,
            "crop": cfg.crop,
            "upscale": cfg.upscale,
            "mean": list(prep.mean),
            "std": list(prep.std),
            "best_epoch": best["epoch"],
            "best_val_auc": best["auc"],
            "epochs_run": len(history),
            "device": device.type,
            "lr": lr,
            "train": cfg.model_dump(mode="json"),
            "seed": seed,
            "history": history,
        }
        save_model(out_dir, best["state"], meta, commit)
    ckpt_path.unlink(missing_ok=True)  # the run is complete; a rerun starts afresh
    return meta


def check_sides(backbone: str, cfg: TrainParams, y_train: np.ndarray, y_val: np.ndarray, split: Path) -> None:
    """Refuse, before anything is trained or written, data a model cannot honestly learn or be judged on."""
    key = f"models.{backbone}.batch_size (or train.batch_size)"
    if len(y_train) < cfg.batch_size:
        raise HcdError(f"train {backbone}: batch size {cfg.batch_size} is larger than the {len(y_train)} training patches, so no step would be taken; set {key} to {max(2, len(y_train))} or lower")
    for side, y in (("training", y_train), ("validation", y_val)):
        counts = np.bincount(y.astype(np.int64), minlength=2)
        if len(y) == 0 or counts.min() == 0:
            raise HcdError(f"{split}: the {side} side holds {counts[0]} negative and {counts[1]} positive patches; both classes are needed (rerun split with other split.* params)")


def _log_epoch(live, rec: dict) -> None:
    live.log_metric("train/loss", rec["train_loss"])
    live.log_metric("val/loss", rec["val_loss"])
    live.log_metric("val/auc", rec["val_auc"])
    live.next_step()


def oom_message(what: str, device: torch.device, batch_size: int, key: str, note: str = "") -> str:
    """One line for an out-of-memory error: the batch size that failed and a smaller one to try."""
    where = str(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        where += f" ({total / 2**30:.0f} GiB, {free / 2**30:.1f} GiB free now)"
    return f"{what}: out of GPU memory on {where} at batch size {batch_size}; set {key} to {max(1, batch_size // 2)} or lower{note}"


def save_model(out_dir: Path, state: dict[str, torch.Tensor], meta: dict, commit: Commit) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(commit.path(out_dir / "model.safetensors")))
    commit.json(out_dir / "model.json", meta)


def load_model(model_dir: Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """Weights from safetensors (no pickle, so no code can run) plus the metadata JSON."""
    from safetensors.torch import load_file

    meta = read_model_meta(model_dir / "model.json")
    model = build_model(meta["backbone"], pretrained=False)
    try:
        state = load_file(str(model_dir / "model.safetensors"))
    except FileNotFoundError:
        raise HcdError(f"{model_dir / 'model.safetensors'}: file not found (run train first)") from None
    except Exception as exc:
        raise HcdError(f"{model_dir / 'model.safetensors'}: not a readable safetensors file ({type(exc).__name__})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise HcdError(f"{model_dir / 'model.safetensors'}: does not fit backbone {meta['backbone']!r} ({str(exc).splitlines()[0][:100]})") from None
    return model.to(device).eval(), meta


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="train", description=__doc__.splitlines()[0])
    ap.add_argument("backbone")
    ap.add_argument("--packed", default="data/packed/train_x.npy")
    ap.add_argument("--index", default="data/packed/train_index.csv")
    ap.add_argument("--split", default="data/split/split.csv")
    ap.add_argument("--stats", default="data/stats/stats.json")
    ap.add_argument("--out-dir", default=None, help="default: models/<backbone>")
    ap.add_argument("--live-dir", default=None, help="default: dvclive/<backbone>")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    if args.backbone not in params.backbones:
        raise HcdError(f"backbones: {args.backbone!r} is not in {params.backbones}")
    out = Path(args.out_dir or f"models/{args.backbone}")
    live = Path(args.live_dir or f"dvclive/{args.backbone}")
    clean_stale_temps(out / "model.safetensors", out / "model.json", out / checkpoint.NAME, live)
    train(args.backbone, params, Path(args.packed), Path(args.index), Path(args.split), Path(args.stats), out, live, log=lambda m: print(m, file=sys.stderr))
