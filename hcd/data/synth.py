"""A deterministic synthetic PCam-like dataset, written in the Kaggle layout.

Why: a fresh clone must run end to end offline, and tests need data whose truth
is known. Each patch is H&E-like — pink eosin stroma with fibre texture, pale
lumen/fat, small dark-purple normal nuclei — and tumour cells are clusters of
larger, pleomorphic, vesicular nuclei. The label is 1 exactly when a tumour
nucleus reaches into the centre 32×32 px; negatives carry tumour clusters
*off-centre*, so a model must learn the centre rule, not "tumour anywhere".

Patches come from slides. A slide has one of two "hospital" stain palettes
(plus its own jitter), a nucleus density and a tumour burden, so neighbouring
patches share appearance and positives cluster in tumour slides — a random
split leaks, as on the real data. Test patches come from other slides.

Determinism: ids, labels and slides are drawn from one RNG stream
(:func:`truth`), each patch is rendered from its own ``(seed, split, index)``
stream, so the archive is byte-identical for the same params on any machine.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hcd.atomic import atomic_path
from hcd.data.tiff import encode_patch
from hcd.pipeline.params import DemoParams

SIZE = 96
CENTRE = (32, 64)  # the labelled centre region, [32, 64) on both axes
_ZIP_DATE = (2019, 1, 1, 0, 0, 0)  # fixed member dates: archives are byte-identical

# Stain palettes (RGB) of the two "hospitals": eosin (stroma), haematoxylin (nuclei).
_HOSPITALS = (
    {"eosin": (236, 160, 196), "haem": (72, 38, 128), "bg": (246, 222, 236)},
    {"eosin": (222, 138, 168), "haem": (96, 52, 150), "bg": (240, 214, 226)},
)


@dataclass(frozen=True)
class Truth:
    """What the generator knows: ids, labels and slides for both sides."""

    train: pd.DataFrame  # id, label, slide
    test: pd.DataFrame  # id, label, slide


def _hex_id(seed: int, split: str, i: int) -> str:
    return hashlib.sha1(f"hcd-demo:{seed}:{split}:{i}".encode()).hexdigest()


def _slides(rng: np.random.Generator, n_slides: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "hospital": rng.integers(0, 2, n_slides),
            "burden": rng.uniform(0.05, 0.85, n_slides),
            "density": rng.uniform(0.7, 1.3, n_slides),
            "jitter_r": rng.normal(0, 6, n_slides),
            "jitter_g": rng.normal(0, 6, n_slides),
            "jitter_b": rng.normal(0, 6, n_slides),
            "blur": rng.choice([0.0, 0.0, 0.0, 0.6, 1.0], n_slides),  # some slides are out of focus
        }
    )


def _assign(rng: np.random.Generator, n: int, frac: float, slides: pd.DataFrame, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Exactly round(n*frac) positives; positives land mostly in high-burden slides."""
    labels = np.zeros(n, dtype=np.int64)
    labels[: int(round(n * frac))] = 1
    rng.shuffle(labels)
    w = slides["burden"].to_numpy()
    p_pos, p_neg = w / w.sum(), (1 - w) / (1 - w).sum()
    slide = np.where(
        labels == 1,
        rng.choice(len(w), size=n, p=p_pos),
        rng.choice(len(w), size=n, p=p_neg),
    )
    return labels, slide + offset


def truth(p: DemoParams) -> Truth:
    """Ids, labels and slide of every demo patch — cheap, no rendering."""
    rng = np.random.default_rng([p.seed, 1])
    n_test_slides = max(2, p.n_slides // 4)
    tr_slides, te_slides = _slides(rng, p.n_slides), _slides(rng, n_test_slides)
    tr_lab, tr_sl = _assign(rng, p.n_train, p.positive_fraction, tr_slides, 0)
    te_lab, te_sl = _assign(rng, p.n_test, p.positive_fraction, te_slides, p.n_slides)
    train = pd.DataFrame({"id": [_hex_id(p.seed, "train", i) for i in range(p.n_train)], "label": tr_lab, "slide": tr_sl})
    test = pd.DataFrame({"id": [_hex_id(p.seed, "test", i) for i in range(p.n_test)], "label": te_lab, "slide": te_sl})
    return Truth(train, test)


def _all_slides(p: DemoParams) -> pd.DataFrame:
    rng = np.random.default_rng([p.seed, 1])
    return pd.concat([_slides(rng, p.n_slides), _slides(rng, max(2, p.n_slides // 4))], ignore_index=True)


# ----------------------------------------------------------------------------- rendering
_GRID = np.arange(SIZE, dtype=np.float32)


def _smooth_field(rng: np.random.Generator, cells: int) -> np.ndarray:
    """A smooth random field in [-1, 1], 96x96: bilinear upsampling of a coarse grid."""
    coarse = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    x = np.linspace(0, cells - 1, SIZE, dtype=np.float32)
    i0 = np.clip(x.astype(int), 0, cells - 2)
    t = x - i0
    m = np.zeros((SIZE, cells), np.float32)  # interpolation matrix, 96 x cells
    m[np.arange(SIZE), i0] = 1 - t
    m[np.arange(SIZE), i0 + 1] += t
    return m @ coarse @ m.T


def _nucleus(img: np.ndarray, rng: np.random.Generator, cy: float, cx: float, r: float, color: np.ndarray, aspect: float, vesicular: float, opacity: float) -> None:
    """Alpha-blend one elliptical nucleus with soft edges and chromatin texture into ``img``."""
    a, b = r * aspect, r / aspect
    ext = int(np.ceil(max(a, b))) + 2
    y0, y1 = max(0, int(cy) - ext), min(SIZE, int(cy) + ext + 1)
    x0, x1 = max(0, int(cx) - ext), min(SIZE, int(cx) + ext + 1)
    if y0 >= y1 or x0 >= x1:
        return
    th = rng.uniform(0, np.pi)
    yy, xx = _GRID[y0:y1, None] - cy, _GRID[None, x0:x1] - cx
    u = xx * np.cos(th) + yy * np.sin(th)
    v = -xx * np.sin(th) + yy * np.cos(th)
    d = np.sqrt((u / a) ** 2 + (v / b) ** 2)  # 1 on the membrane
    alpha = np.clip((1.0 - d) * 3.0, 0.0, 1.0) * opacity
    # vesicular nuclei: pale centre, dark rim; plus granular chromatin
    alpha *= 1.0 - vesicular * np.clip(1.0 - d * 1.6, 0.0, 1.0)
    alpha *= rng.uniform(0.75, 1.0, alpha.shape).astype(np.float32)
    patch = img[y0:y1, x0:x1]
    patch += alpha[..., None] * (color - patch)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (an out-of-focus scan)."""
    r = np.arange(-2, 3, dtype=np.float32)
    k = np.exp(-0.5 * (r / sigma) ** 2)
    k /= k.sum()
    pad = np.pad(img, ((2, 2), (2, 2), (0, 0)), mode="reflect")
    rows = sum(k[i] * pad[i : i + SIZE, :, :] for i in range(5))
    return sum(k[i] * rows[:, i : i + SIZE, :] for i in range(5))


def _touches_centre(cy: float, cx: float, r: float) -> bool:
    lo, hi = CENTRE
    return (lo - r < cy < hi - 1 + r) and (lo - r < cx < hi - 1 + r)


def render(seed: int, split: str, index: int, label: int, slide: pd.Series) -> np.ndarray:
    """One 96x96x3 uint8 H&E-like patch; tumour in the centre 32x32 iff ``label``.

    Every step draws from one generator seeded by (seed, split, index), in this order:
    the archive is a function of the params alone."""
    rng = np.random.default_rng([seed, 2, 0 if split == "train" else 1, index])
    pal = _HOSPITALS[int(slide["hospital"])]
    jitter = np.array([slide["jitter_r"], slide["jitter_g"], slide["jitter_b"]], np.float32)
    eosin = np.array(pal["eosin"], np.float32) + jitter
    haem = np.array(pal["haem"], np.float32) + jitter * 0.5
    img = _stroma(rng, np.array(pal["bg"], np.float32), eosin)
    _normal_nuclei(img, rng, float(slide["density"]), haem)
    clusters = _cluster_centres(rng, label)
    if label == 0 and rng.random() < 0.3:
        _mimics(img, rng, haem)
    hard = label == 1 and rng.random() < 0.25  # hard positives: one small, faint tumour cell in the centre
    placed_in_centre = _tumour(img, rng, clusters, hard, haem)
    assert placed_in_centre == bool(label), "generator invariant: label <=> tumour cell in the centre"
    if slide["blur"] > 0:
        img = _blur(img, float(slide["blur"]))

    img += rng.normal(0.0, 3.5, img.shape).astype(np.float32)  # sensor noise
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _stroma(rng: np.random.Generator, bg: np.ndarray, eosin: np.ndarray) -> np.ndarray:
    """The background: smooth density variation + oriented fibres; pale lumen/fat where the field is high."""
    dens = _smooth_field(rng, 5)
    ang, freq = rng.uniform(0, np.pi), rng.uniform(0.25, 0.6)
    fibres = np.sin((_GRID[:, None] * np.sin(ang) + _GRID[None, :] * np.cos(ang)) * freq + rng.uniform(0, 6.3))
    stroma = np.clip(0.75 + 0.2 * dens + 0.08 * fibres * (0.5 + 0.5 * _smooth_field(rng, 4)), 0.0, 1.0)
    lumen = np.clip((_smooth_field(rng, 4) - rng.uniform(0.35, 1.2)) * 4.0, 0.0, 1.0)
    stroma *= 1.0 - lumen
    return bg + stroma[..., None] * (eosin - bg)


def _normal_nuclei(img: np.ndarray, rng: np.random.Generator, density: float, haem: np.ndarray) -> None:
    """Normal nuclei anywhere: small, round, dark."""
    for _ in range(int(rng.poisson(26 * density))):
        _nucleus(img, rng, rng.uniform(0, SIZE), rng.uniform(0, SIZE), rng.uniform(1.6, 3.3), haem * rng.uniform(0.75, 1.05), rng.uniform(1.0, 1.35), 0.0, rng.uniform(0.75, 0.95))


def _cluster_centres(rng: np.random.Generator, label: int) -> list[tuple[float, float, bool]]:
    """Where tumour clusters go, as (cy, cx, may touch the centre): a positive's one in the centre, plus
    off-centre ones (in negatives too, so the label depends on the centre alone)."""
    clusters: list[tuple[float, float, bool]] = []
    if label == 1:
        lo, hi = CENTRE
        clusters.append((rng.uniform(lo - 6, hi + 6), rng.uniform(lo - 6, hi + 6), True))
    n_extra = rng.choice([0, 1, 2], p=[0.45, 0.4, 0.15]) if label == 1 else rng.choice([0, 1, 2], p=[0.35, 0.45, 0.2])
    for _ in range(int(n_extra)):
        while True:  # off-centre: the cluster's centre in the outer ring
            cy, cx = rng.uniform(0, SIZE, 2)
            if not _touches_centre(cy, cx, 10.0):
                break
        clusters.append((cy, cx, False))
    return clusters


def _mimics(img: np.ndarray, rng: np.random.Generator, haem: np.ndarray) -> None:
    """Hard negatives: a histiocyte-like cluster of large, pale, round nuclei in the centre."""
    lo, hi = CENTRE
    for _ in range(int(rng.integers(2, 6))):
        _nucleus(img, rng, rng.uniform(lo, hi), rng.uniform(lo, hi), rng.uniform(2.8, 3.8), haem * rng.uniform(1.05, 1.25), rng.uniform(1.0, 1.15), 0.2, rng.uniform(0.55, 0.75))


def _tumour(img: np.ndarray, rng: np.random.Generator, clusters: list[tuple[float, float, bool]], hard: bool, haem: np.ndarray) -> bool:
    """Each cluster: large, pleomorphic, vesicular nuclei on a purplish cytoplasm. Cells of an off-centre
    cluster that would reach the centre are skipped. Returns whether a tumour cell reaches the centre."""
    tumour_color = haem * np.array([1.05, 0.9, 1.0], np.float32)
    placed_in_centre = False
    for ccy, ccx, may_touch in clusters:
        spread = rng.uniform(6.0, 14.0)
        n_cells = 1 if (hard and may_touch) else int(rng.integers(4, 16))
        cyto = np.clip(1.0 - np.hypot(_GRID[:, None] - ccy, _GRID[None, :] - ccx) / (spread * 1.6), 0.0, 1.0) * 0.35
        img += cyto[..., None] * (haem * 1.6 - img) * 0.5
        for j in range(n_cells):
            r = rng.uniform(3.2, 4.0) if (hard and may_touch) else rng.uniform(3.2, 5.8)
            if may_touch and j == 0:
                lo, hi = CENTRE  # the seed cell of a positive cluster reaches into the centre
                cy, cx = rng.uniform(lo - r + 1.5, hi - 1 + r - 1.5, 2)
            else:
                cy, cx = ccy + rng.normal(0, spread), ccx + rng.normal(0, spread)
            if not may_touch and _touches_centre(cy, cx, r + 1.0):
                continue  # negatives: no tumour cell may reach the centre
            if may_touch and _touches_centre(cy, cx, r):
                placed_in_centre = True
            opacity = rng.uniform(0.55, 0.7) if (hard and may_touch) else rng.uniform(0.8, 0.97)
            _nucleus(img, rng, cy, cx, r, tumour_color * rng.uniform(0.8, 1.15), rng.uniform(1.0, 1.6), rng.uniform(0.3, 0.7), opacity)
    return placed_in_centre


# ----------------------------------------------------------------------------- archive
def _defects(p: DemoParams, tr: pd.DataFrame) -> dict[str, object]:
    """Planted defects: which train/test indices get which defect (deterministic)."""
    rng = np.random.default_rng([p.seed, 3])
    idx = rng.permutation(len(tr))
    return {
        "dark": [int(idx[0])],
        "bright": [int(i) for i in idx[1:4]],
        "truncated": [int(idx[4])],
        "wrong_size": [int(idx[5])],
        # (copy_index, source_index): index idx[6] holds the pixels of idx[7] with the opposite label
        "conflict": (int(idx[6]), int(idx[7])),
        "test_bright": [0],
        "test_truncated": [1],
    }


def _member(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    return info


class _Renderer:
    """Renders one archive member from its job ``(split, index)``: made once, sent once to each worker."""

    def __init__(self, p: DemoParams, t: Truth, tr: pd.DataFrame, planted: dict | None, src_pixels: dict[int, np.ndarray]) -> None:
        self.p, self.t, self.tr, self.planted, self.src = p, t, tr, planted, src_pixels
        self.slides = _all_slides(p)

    def __call__(self, job: tuple[str, int]) -> bytes:
        split, i = job
        row = (self.tr if split == "train" else self.t.test).iloc[i]
        return _render_member(self.p, split, i, int(row["label"]), self.slides.loc[int(row["slide"])], self.planted, self.src if split == "train" else {})


_WORKER: _Renderer | None = None  # each pool worker's renderer, set once by the pool's initializer


def _init_worker(renderer: _Renderer) -> None:
    global _WORKER
    _WORKER = renderer


def _render_in_worker(job: tuple[str, int]) -> tuple[bytes, bytes]:
    """The member's bytes and their deflate stream, compressed here rather than in the one process that
    writes the zip: deflating there capped the generator at about 1,100 patches/s on any number of cores."""
    assert _WORKER is not None
    data = _WORKER(job)
    deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)  # zipfile's, for a ZipInfo member
    return data, deflate.compress(data) + deflate.flush()


class _Deflated:
    """Stands in for a zip member's compressor: the stream a worker already made comes out at the end."""

    def __init__(self, stream: bytes) -> None:
        self.stream = stream

    def compress(self, data: bytes) -> bytes:
        return b""

    def flush(self) -> bytes:
        return self.stream


def _write_deflated(zf: zipfile.ZipFile, name: str, data: bytes, stream: bytes) -> None:
    """``zf.writestr(_member(name), data)`` with the compression done: zipfile still writes the headers,
    the CRC and the sizes; only its compressor is replaced (a private attribute: where it is missing, the
    member is compressed here, to the same bytes)."""
    info = _member(name)
    info.file_size = len(data)
    with zf.open(info, "w") as dest:
        if hasattr(dest, "_compressor"):
            dest._compressor = _Deflated(stream)
        dest.write(data)


def write_archive(dest: str | os.PathLike[str], p: DemoParams, *, workers: int | None = None, progress: bool = False) -> Truth:
    """Write the demo dataset to ``dest`` (a zip in the Kaggle layout), atomically.

    Patches render in ``workers`` processes (default: the CPU count); members are
    written in a fixed order by this process, so the archive is byte-identical
    whatever the worker count.
    """
    import multiprocessing as mp

    from hcd.env import workers as default_workers

    workers = workers or default_workers()
    t = truth(p)
    tr, te = t.train.copy(), t.test
    slides = _all_slides(p)
    planted = _defects(p, tr) if p.plant_defects and p.n_train >= 20 and p.n_test >= 2 else None
    if planted is not None:  # the conflicting duplicate carries the opposite label of its source
        copy_i, src_i = planted["conflict"]  # type: ignore[misc]
        tr.loc[copy_i, "label"] = 1 - int(tr.loc[src_i, "label"])

    order_rng = np.random.default_rng([p.seed, 4])
    src_pixels: dict[int, np.ndarray] = {}
    if planted is not None:
        src_i = planted["conflict"][1]  # type: ignore[index]
        src_pixels[src_i] = render(p.seed, "train", src_i, int(t.train.loc[src_i, "label"]), slides.loc[int(tr.loc[src_i, "slide"])])
    with atomic_path(dest) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        labels_csv = tr.iloc[order_rng.permutation(len(tr))][["id", "label"]].to_csv(index=False, lineterminator="\n")
        zf.writestr(_member("train_labels.csv"), labels_csv)
        sub = te[["id"]].assign(label=0).iloc[order_rng.permutation(len(te))]
        zf.writestr(_member("sample_submission.csv"), sub.to_csv(index=False, lineterminator="\n"))
        jobs = [("train", int(i)) for i in order_rng.permutation(len(tr))] + [("test", int(i)) for i in order_rng.permutation(len(te))]
        names = [f"{split}/{(tr if split == 'train' else te).iloc[i]['id']}.tif" for split, i in jobs]
        renderer = _Renderer(p, t, tr, planted, src_pixels)
        if workers > 1 and len(jobs) > 256:
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            # Not `with Pool(...)`: its exit SIGTERMs every worker, and a worker still starting when the work
            # is done (one can render a small archive alone) loses a signal that arrives before CPython's
            # after-fork reset, blocks on the task queue, and the stage waits for it forever (seen twice in
            # the test suite). Closed, the workers leave on the queue's sentinels; terminate only on failure.
            pool = mp.get_context(method).Pool(workers, _init_worker, (renderer,))
            try:
                for k, (data, stream) in enumerate(pool.imap(_render_in_worker, jobs, chunksize=64)):
                    _write_deflated(zf, names[k], data, stream)
                    if progress and k % 5000 == 0:
                        print(f"  demo: {k}/{len(jobs)} patches", flush=True)
                pool.close()
            except BaseException:
                pool.terminate()
                raise
            finally:
                pool.join()
        else:
            for k, job in enumerate(jobs):
                zf.writestr(_member(names[k]), renderer(job))
    return Truth(tr, te)


def _render_member(p: DemoParams, split: str, i: int, label: int, slide: pd.Series, planted: dict | None, src_pixels: dict[int, np.ndarray]) -> bytes:
    if planted is not None:
        if split == "train":
            if i in planted["dark"]:
                return encode_patch(np.zeros((SIZE, SIZE, 3), np.uint8))
            if i in planted["bright"]:
                return _near_white(p.seed, 5, i)
            if i in planted["truncated"]:
                return _truncated(render(p.seed, split, i, label, slide), 2)
            if i in planted["wrong_size"]:
                return encode_patch(render(p.seed, split, i, label, slide)[:, :95])
            copy_i, src_i = planted["conflict"]
            if i in (copy_i, src_i):  # the conflicting duplicate and its source: the same pixels
                return encode_patch(src_pixels[src_i])
        else:
            if i in planted["test_bright"]:
                return _near_white(p.seed, 6, i)
            if i in planted["test_truncated"]:
                return _truncated(render(p.seed, split, i, label, slide), 3)
    return encode_patch(render(p.seed, split, i, label, slide))


def _near_white(seed: int, stream: int, i: int) -> bytes:
    """A planted near-white patch: every pixel 247..255, from its own random stream."""
    return encode_patch(np.random.default_rng([seed, stream, i]).integers(247, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def _truncated(img: np.ndarray, keep: int) -> bytes:
    """A planted truncated file: the first 1/keep of the patch's TIFF bytes."""
    full = encode_patch(img)
    return full[: len(full) // keep]


def planted_defects(p: DemoParams) -> dict[str, list[str]]:
    """Ids of the planted defects by the scan reason that must flag them (for tests)."""
    if not p.plant_defects:
        return {}
    t = truth(p)
    d = _defects(p, t.train)
    tid, teid = t.train["id"].tolist(), t.test["id"].tolist()
    return {
        "dark": [tid[i] for i in d["dark"]],
        "bright": [tid[i] for i in d["bright"]],
        "undecodable": [tid[i] for i in d["truncated"]],
        "wrong_format": [tid[i] for i in d["wrong_size"]],
        "conflicting_duplicate": sorted(tid[i] for i in d["conflict"]),
        "test_bright": [teid[i] for i in d["test_bright"]],
        "test_undecodable": [teid[i] for i in d["test_truncated"]],
    }


def write_truth(out_dir: str | os.PathLike[str], p: DemoParams) -> None:
    """Test labels and slide groups of the demo (not part of the Kaggle layout)."""
    t = truth(p)
    out = Path(out_dir)
    from hcd.atomic import write_csv

    write_csv(out / "demo_test_labels.csv", t.test[["id", "label"]])
    write_csv(out / "demo_slides.csv", pd.concat([t.train, t.test])[["id", "slide"]].rename(columns={"slide": "group"}))
