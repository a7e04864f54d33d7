"""Benchmark the data stages: scan throughput, scan peak memory, the stats pass.

Usage:
    python benchmarks/bench_data.py [--archive ZIP] [--repeat 3] [--full-size] [--stats-patches N] [--out FILE]

1. Scan throughput from an archive ÷ a plain ``tifffile.imread`` loop over the
   same patches extracted to files, measured side by side in one run (median of
   ``--repeat``), with 1 and with 2 workers. Targets: ≥ 1.0 on one core, and
   the 2-worker ratio ≥ 1.7 × the 1-worker one. The archive is ``--archive``, or
   HCD_REAL_ZIP (Kaggle's own deflated TIFFs), or a generated demo archive.
2. ``--full-size``: peak memory of scan on a generated archive of Kaggle's full
   size (220,025 train + 57,458 test = 277,483 patches), as the sum of the
   proportional set size (PSS) of the scan process and its workers, sampled
   every 50 ms. Target: under 2 GB beyond the packed output (which scan writes
   with pwrite and never holds). Needs ~16 GB of free disk.

3. The ``stats`` stage's pass (``--stats-patches``, default 40,000; 0 skips it) on a
   packed array of random patches: ``hcd.stages.stats`` ÷ the column reduction it
   replaced (sums of the (pixels, 3) array per channel, exact uint64, the same
   integers), and with five folds its one pass ÷ one pass per fold. Both sides read
   the same page-cached array; the outputs must be equal.

Absolute times are printed for context; the ratios are the figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import psutil
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hcd.atomic import write_json  # noqa: E402
from hcd.data.synth import _all_slides, render, truth, write_archive  # noqa: E402
from hcd.data.tiff import encode_patch  # noqa: E402
from hcd.pipeline.params import DemoParams, ScanParams  # noqa: E402
from hcd.stages.scan import ScanOutputs, scan  # noqa: E402
from hcd.stages.stats import channel_stats, stats_from_sums, stats_per_held_out  # noqa: E402

KAGGLE_TRAIN, KAGGLE_TEST = 220_025, 57_458


def outputs(root: Path) -> ScanOutputs:
    return ScanOutputs(root / "report.csv", root / "summary.json", root / "train_x.npy", root / "train_index.csv", root / "test_x.npy", root / "test_index.csv")


def throughput(archive: Path, repeat: int, work: Path, out_root: Path) -> dict:
    """Both sides in memory: the imread loop reads page-cached files, the scan reads the page-cached
    archive and writes its packed output to ``out_root`` (tmpfs when there is one), so disk
    writeback — which the imread loop never pays — does not enter the ratio."""
    extracted = work / "extracted"
    with zipfile.ZipFile(archive) as zf:
        members = [n for n in zf.namelist() if n.endswith(".tif")]
        zf.extractall(extracted, members)
    files = [extracted / m for m in members]
    n = len(files)
    _ = archive.read_bytes()  # both sides from a warm page cache

    def imread_loop() -> float:
        t = time.perf_counter()
        for f in files:
            tifffile.imread(f)
        return time.perf_counter() - t

    def scan_run(workers: int) -> float:
        t = time.perf_counter()
        scan(archive, outputs(out_root / f"scan{workers}"), ScanParams(drop_outliers=False), workers=workers, log=lambda m: None)
        return time.perf_counter() - t

    imread_loop(), scan_run(1)  # warm-up: imports, page cache
    t_ref, t_1, t_2 = [], [], []
    for _ in range(repeat):  # interleaved, so drift on a shared machine hits all three alike
        t_ref.append(imread_loop())
        t_1.append(scan_run(1))
        t_2.append(scan_run(2))
    ref, one, two = (statistics.median(v) for v in (t_ref, t_1, t_2))
    return {
        "patches": n,
        "imread_loop_patches_per_s": round(n / ref),
        "scan_1_worker_patches_per_s": round(n / one),
        "scan_2_workers_patches_per_s": round(n / two),
        "ratio_1_worker": round(ref / one, 3),
        "ratio_2_workers": round(ref / two, 3),
        "speedup_2_over_1": round(one / two, 3),
    }


def scaled_archive(source: Path, dest: Path, n_patches: int) -> None:
    """A Kaggle-format archive of ``n_patches`` built from ``source``'s own patches (deflated like
    Kaggle's), each made unique by a changed pixel, so throughput is measured at a scale where the
    per-patch rate, not start-up, dominates."""
    with zipfile.ZipFile(source) as zf:
        pool = [zf.read(n) for n in zf.namelist() if n.endswith(".tif")][:2000]
    n_test = n_patches // 5
    n_train = n_patches - n_test
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        ids = [f"{i:040x}" for i in range(n_patches)]
        zf.writestr("train_labels.csv", "id,label\n" + "".join(f"{i},{int(lab)}\n" for i, lab in zip(ids[:n_train], rng.random(n_train) < 0.4)))
        zf.writestr("sample_submission.csv", "id,label\n" + "".join(f"{i},0\n" for i in ids[n_train:]))
        for k, pid in enumerate(ids):
            data = bytearray(pool[k % len(pool)])
            data[-8:] = k.to_bytes(8, "little")  # the last pixels: unique content
            zf.writestr(f"{'train' if k < n_train else 'test'}/{pid}.tif", bytes(data))


def full_size_archive(path: Path, n_train: int = KAGGLE_TRAIN, n_test: int = KAGGLE_TEST, pool: int = 256) -> None:
    """A Kaggle-size archive fast: rendered patches from a pool, each made unique by its index bytes."""
    p = DemoParams(n_train=max(pool, 20), n_test=10)
    t, slides = truth(p), _all_slides(p)
    templates = []
    for i in range(pool):
        row = t.train.iloc[i]
        templates.append(encode_patch(render(p.seed, "train", i, int(row["label"]), slides.loc[int(row["slide"])])))
    offset = len(templates[0]) - 96 * 96 * 3  # pixel data follows the header in encode_patch's layout
    rng = np.random.default_rng(0)
    labels = rng.random(n_train) < 0.4
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        ids_train = [f"{i:040x}" for i in range(n_train)]
        ids_test = [f"{i + n_train:040x}" for i in range(n_test)]
        zf.writestr("train_labels.csv", "id,label\n" + "".join(f"{i},{int(lab)}\n" for i, lab in zip(ids_train, labels)))
        zf.writestr("sample_submission.csv", "id,label\n" + "".join(f"{i},0\n" for i in ids_test))
        for k, pid in enumerate(ids_train + ids_test):
            data = bytearray(templates[k % pool])
            data[offset : offset + 8] = k.to_bytes(8, "little")  # unique pixels: no false duplicates
            zf.writestr(f"{'train' if k < n_train else 'test'}/{pid}.tif", bytes(data))


def run_measuring_memory(cmd: list[str], cwd: Path, env: dict | None = None) -> dict:
    """Run ``cmd``, sampling every 50 ms the PSS summed over it and its children (shared pages
    counted once) and the RSS of the main process; stderr goes to a file, so it can never stall."""
    with tempfile.TemporaryFile("w+") as err:
        proc = psutil.Popen(cmd, cwd=cwd, env=env, stderr=err, text=True)
        peak_pss = peak_rss = 0
        t0 = time.perf_counter()
        while proc.poll() is None:
            try:
                pss = 0
                for q in [proc, *proc.children(recursive=True)]:
                    try:
                        pss += q.memory_full_info().pss
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
                peak_pss = max(peak_pss, pss)
                peak_rss = max(peak_rss, proc.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)
        seconds = time.perf_counter() - t0
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd[:3])} failed: {err.read()[-2000:]}")
    return {"seconds": seconds, "peak_pss": peak_pss, "peak_rss_main": peak_rss}


def peak_memory(archive: Path, work: Path, workers: int) -> dict:
    from hcd.pipeline.table import packed_args

    cmd = [sys.executable, "-m", "hcd", "scan", str(archive), "--report", str(work / "report.csv"), "--summary", str(work / "scan.json"), *packed_args(work / "packed"), "--workers", str(workers)]
    run = run_measuring_memory(cmd, Path(__file__).resolve().parents[1])
    peak_pss, peak_rss_parent, elapsed = run["peak_pss"], run["peak_rss_main"], run["seconds"]
    packed = sum((work / "packed" / f).stat().st_size for f in ("train_x.npy", "test_x.npy"))
    return {
        "patches": KAGGLE_TRAIN + KAGGLE_TEST,
        "workers": workers,
        "scan_seconds": round(elapsed, 1),
        "packed_output_gb": round(packed / 1e9, 2),
        "peak_pss_all_processes_gb": round(peak_pss / 1e9, 3),
        "peak_rss_main_process_gb": round(peak_rss_parent / 1e9, 3),
        "target_gb": 2.0,
        "within_target": peak_pss < 2e9,
    }


def column_stats(x: np.ndarray, rows: np.ndarray, chunk_rows: int = 1024) -> dict:
    """The stats pass before 2026-12-01: each chunk as (pixels, 3), summed down the columns in uint64."""
    rows = np.sort(rows)
    s1, s2 = np.zeros(3, dtype=np.uint64), np.zeros(3, dtype=np.uint64)
    for start in range(0, len(rows), chunk_rows):
        block = np.asarray(x[rows[start : start + chunk_rows]]).reshape(-1, 3)
        s1 += block.sum(axis=0, dtype=np.uint64)
        sq = block.astype(np.uint16)
        sq *= sq
        s2 += sq.sum(axis=0, dtype=np.uint64)
    return stats_from_sums(s1, s2, len(rows), int(np.prod(x.shape[1:3])))


def stats_pass(n: int, work: Path, folds: int = 5) -> dict:
    rng = np.random.default_rng(0)
    x = np.lib.format.open_memmap(work / "train_x.npy", mode="w+", dtype=np.uint8, shape=(n, 96, 96, 3))
    for start in range(0, n, 5000):
        x[start : start + 5000] = rng.integers(0, 256, (min(5000, n - start), 96, 96, 3), dtype=np.uint8)
    x.flush()
    rows, fold = np.arange(n), rng.integers(0, folds, n)
    held = [fold == k for k in range(folds)]
    _ = np.asarray(x).sum(dtype=np.uint64)  # both sides from a warm page cache

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t

    new, t_new = timed(lambda: channel_stats(x, rows[~held[0]]))
    old, t_old = timed(lambda: column_stats(x, rows[~held[0]]))
    assert new == old, "the stats pass differs from the column reduction"
    one, t_one = timed(lambda: stats_per_held_out(x, rows, held))
    each, t_each = timed(lambda: [channel_stats(x, rows[~h]) for h in held])
    assert one == each, "one pass for every fold differs from a pass per fold"
    return {
        "patches": n,
        "array_gb": round(x.nbytes / 1e9, 3),
        "column_reduction_s": round(t_old, 2),
        "stats_pass_s": round(t_new, 2),
        "ratio_column_over_pass": round(t_old / t_new, 2),
        "folds": folds,
        "pass_per_fold_s": round(t_each, 2),
        "one_pass_all_folds_s": round(t_one, 2),
        "ratio_per_fold_over_one_pass": round(t_each / t_one, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archive", default=os.environ.get("HCD_REAL_ZIP"))
    ap.add_argument("--patches", type=int, default=50000, help="throughput is measured on an archive of this many patches built from --archive's (or demo) patches; per-run costs (central directory, worker start) are amortised as on Kaggle's 277k")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--full-size", action="store_true", help="also measure peak memory at Kaggle's full size")
    ap.add_argument("--no-throughput", action="store_true", help="skip the throughput part")
    ap.add_argument("--stats-patches", type=int, default=40000, help="patches in the stats pass's array (0: skip it)")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", default="benchmarks/out/data.json")
    args = ap.parse_args()
    results: dict = {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        if not args.no_throughput:
            source = Path(args.archive) if args.archive else work / "demo.zip"
            if not args.archive:  # only the throughput part reads it
                write_archive(source, DemoParams(n_train=1600, n_test=400, plant_defects=False))
            archive = work / "scaled.zip"
            scaled_archive(source, archive, args.patches)
            print(f"scan throughput: {args.patches} patches from {source}", flush=True)
            shm = Path("/dev/shm")
            with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else work) as out_root:
                results["scan_throughput"] = tp = throughput(archive, args.repeat, work / "tp", Path(out_root))
                tp["packed_output_on"] = "tmpfs" if out_root.startswith(str(shm)) else "disk"
            archive.unlink()
            print(f"  {tp['patches']} patches; imread loop {tp['imread_loop_patches_per_s']}/s, scan {tp['scan_1_worker_patches_per_s']}/s (1 worker), {tp['scan_2_workers_patches_per_s']}/s (2 workers)")
            print(f"  ratio scan/imread: {tp['ratio_1_worker']} (1 worker, target >= 1.0), {tp['ratio_2_workers']} (2 workers); 2 workers / 1 = {tp['speedup_2_over_1']} (target >= 1.7)")
        if args.full_size:
            big = work / "full.zip"
            t = time.perf_counter()
            full_size_archive(big)
            print(f"full-size archive: {big.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s", flush=True)
            results["scan_memory"] = mem = peak_memory(big, work / "mem", workers=2)
            print(f"  scan of {mem['patches']} patches, 2 workers: {mem['scan_seconds']} s; packed output {mem['packed_output_gb']} GB")
            print(f"  peak memory (PSS, all processes): {mem['peak_pss_all_processes_gb']} GB (target < 2.0 beyond the packed output); main process RSS {mem['peak_rss_main_process_gb']} GB")
        if args.stats_patches:
            results["stats_pass"] = st = stats_pass(args.stats_patches, work)
            print(f"stats pass: {st['patches']} patches ({st['array_gb']} GB): column reduction {st['column_reduction_s']} s, hcd {st['stats_pass_s']} s: ratio {st['ratio_column_over_pass']}")
            print(f"  {st['folds']} folds: a pass per fold {st['pass_per_fold_s']} s, one pass {st['one_pass_all_folds_s']} s: ratio {st['ratio_per_fold_over_one_pass']}; outputs equal")
    write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
