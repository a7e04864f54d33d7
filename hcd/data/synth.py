"""A deterministic synthetic PCam-like dataset, written in the Kaggle layout.

Why: a fresh clone must run end to end offline, and tests need data whose truth is
known. The demo is made to be about as hard as the real task, so that the figures a new
user sees (validation AUC, what TTA, an ensemble, a learning rate or slide-grouped folds
change) mean something: the default recipe scores near 0.9 on it, as on real patches.

Each patch is rendered in optical density and turned into RGB through Beer–Lambert
with a "hospital's" haematoxylin and eosin vectors: lymph-node tissue (dense small
dark lymphocytes), fat (empty cells with thin membranes), fibrous stroma with spindle
nuclei, sinus histiocytes (large pale nuclei: the mimics), and tumour cells — large,
vesicular nuclei with nucleoli on a purplish cytoplasm. Tumour atypia is a per-slide
continuum (``grade``): low-grade tumour nuclei are as large as histiocytes'. The label
is 1 exactly when a tumour nucleus reaches into the centre 32×32 px — sometimes by a
pixel or two (a single cell at the centre's edge); negatives carry tumour off-centre,
so a model must learn the centre rule, not "tumour anywhere".

Patches come from slides. A slide has one of five hospitals' stain vectors, its own
stain strengths and tint, a tissue profile, a tumour burden and grade, and may be out
of focus or compressed (8×8-block quantisation, as JPEG does), so neighbouring patches
share appearance and positives cluster in tumour slides — a random split leaks, as on
the real data. Test patches come from other slides. A few per cent of labels are
"disputed": the label says the opposite of what was rendered (an equal number each
way, so the positive fraction stays exact), as a second pathologist would now and then.

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

# Hospitals: optical-density vectors of haematoxylin and eosin (Ruifrok & Johnston's, rotated a little per
# hospital), a stain strength and a background (the slide's glass through the scanner).
_HOSPITALS = (
    {"h": (0.65, 0.70, 0.29), "e": (0.07, 0.99, 0.11), "bg": (246, 240, 246), "hs": 1.00, "es": 1.00},
    {"h": (0.55, 0.76, 0.34), "e": (0.10, 0.95, 0.20), "bg": (242, 232, 240), "hs": 1.15, "es": 0.80},
    {"h": (0.70, 0.66, 0.26), "e": (0.05, 1.00, 0.06), "bg": (248, 244, 250), "hs": 0.85, "es": 1.25},
    {"h": (0.60, 0.72, 0.35), "e": (0.16, 0.92, 0.30), "bg": (238, 228, 236), "hs": 1.30, "es": 0.95},
    {"h": (0.74, 0.60, 0.30), "e": (0.09, 0.97, 0.15), "bg": (250, 246, 248), "hs": 0.95, "es": 1.10},
)


DISPUTED = 0.04  # the fraction of labels that say the opposite of the rendering
NEIGHBOURS = 0.35  # the fraction of train patches showing again the tissue of an earlier one of their slide
LN10 = np.float32(np.log(10.0))


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
            "hospital": rng.integers(0, len(_HOSPITALS), n_slides),
            "burden": rng.uniform(0.05, 0.85, n_slides),
            "grade": rng.uniform(0.0, 1.0, n_slides),  # tumour atypia: low grade looks like histiocytes
            "lymphoid": rng.uniform(0.1, 0.9, n_slides),  # the tissue profile: lymph node cortex, fat
            "fat": rng.uniform(0.0, 0.5, n_slides),
            "stain_h": rng.normal(1.0, 0.12, n_slides),
            "stain_e": rng.normal(1.0, 0.15, n_slides),
            "tint": rng.normal(0.0, 0.05, n_slides),
            "blur": rng.choice([0.0, 0.0, 0.0, 0.6, 0.9], n_slides),  # some slides are out of focus
            "jpeg": rng.choice([0.0, 0.0, 8.0, 16.0], n_slides),  # and some compressed: the quantisation step
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
    """Ids, labels and slide of every demo patch — cheap, no rendering. ``label`` is what the CSVs say;
    ``drawn`` is what the patch shows (they differ for the disputed few, :data:`DISPUTED`)."""
    rng = np.random.default_rng([p.seed, 1])
    n_test_slides = max(2, p.n_slides // 4)
    tr_slides, te_slides = _slides(rng, p.n_slides), _slides(rng, n_test_slides)
    tr_lab, tr_sl = _assign(rng, p.n_train, p.positive_fraction, tr_slides, 0)
    te_lab, te_sl = _assign(rng, p.n_test, p.positive_fraction, te_slides, p.n_slides)
    shown = _disputed(rng, tr_lab)
    train = pd.DataFrame({"id": [_hex_id(p.seed, "train", i) for i in range(p.n_train)], "label": shown, "slide": tr_sl, "drawn": tr_lab, "twin": _neighbours(rng, tr_sl, tr_lab * 2 + shown)})
    test = pd.DataFrame({"id": [_hex_id(p.seed, "test", i) for i in range(p.n_test)], "label": _disputed(rng, te_lab), "slide": te_sl, "drawn": te_lab, "twin": -1})
    return Truth(train, test)


def _neighbours(rng: np.random.Generator, slide: np.ndarray, kind: np.ndarray) -> np.ndarray:
    """For :data:`NEIGHBOURS` of the train patches, an earlier patch of the same slide and kind (drawn and
    annotated label: overlapping patches carry one annotation, disputed or not) whose tissue they show again,
    turned (-1: none). Real patches are cut from slides with overlap; a split that puts neighbours on both
    sides lets a model recognise tissue — and an annotation — it trained on: the leak slide groups stop."""
    twin = np.full(len(slide), -1, np.int64)
    pick = rng.random(len(slide)) < NEIGHBOURS
    first: dict[tuple[int, int], list[int]] = {}
    for i in range(len(slide)):
        seen = first.setdefault((int(slide[i]), int(kind[i])), [])
        if pick[i] and seen:
            twin[i] = seen[int(rng.integers(0, len(seen)))]
        else:
            seen.append(i)
    return twin


def _disputed(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """The labels as annotated: the same number of positives and negatives flipped, :data:`DISPUTED` in all."""
    k = int(round(len(labels) * DISPUTED / 2))
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    k = min(k, len(pos), len(neg))
    out = labels.copy()
    out[rng.choice(pos, k, replace=False)] = 0
    out[rng.choice(neg, k, replace=False)] = 1
    return out


def _all_slides(p: DemoParams) -> pd.DataFrame:
    rng = np.random.default_rng([p.seed, 1])
    return pd.concat([_slides(rng, p.n_slides), _slides(rng, max(2, p.n_slides // 4))], ignore_index=True)


# ----------------------------------------------------------------------------- rendering
_GRID = np.arange(SIZE, dtype=np.float32)
H, E = 0, 1  # the two stain channels of a concentration map (2, 96, 96)


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


def _blob(od: np.ndarray, rng: np.random.Generator, cy: float, cx: float, r: float, h: float, e: float, aspect: float = 1.0, vesicular: float = 0.0, nucleolus: float = 0.0, soft: float = 3.0) -> None:
    """Blend an ellipse of stain concentrations (h, e) into ``od``, with soft edges and granular chromatin;
    ``vesicular``: a pale centre and dark rim; ``nucleolus``: a dark dot near the centre."""
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
    alpha = np.clip((1.0 - d) * soft, 0.0, 1.0)
    if vesicular:
        alpha = alpha * (1.0 - vesicular * np.clip(1.0 - d * 1.5, 0.0, 1.0))
    alpha = alpha * rng.uniform(0.7, 1.0, alpha.shape).astype(np.float32)
    if nucleolus:
        ny, nx = rng.normal(0, 0.3 * r, 2)
        alpha = np.maximum(alpha, nucleolus * np.clip(1.6 - np.hypot(yy - ny, xx - nx), 0, 1))
    box = od[:, y0:y1, x0:x1]
    box[H] += alpha * (h - box[H])
    box[E] += alpha * (e - box[E])


def _touches_centre(cy: float, cx: float, r: float) -> bool:
    lo, hi = CENTRE
    return (lo - r < cy < hi - 1 + r) and (lo - r < cx < hi - 1 + r)


def render(seed: int, split: str, index: int, label: int, slide: pd.Series, twin: int = -1) -> np.ndarray:
    """One 96x96x3 uint8 H&E-like patch; a tumour nucleus in the centre 32x32 iff ``label`` (the drawn label).
    ``twin`` >= 0: the tissue of that patch of the slide again, turned by a symmetry of the square (the
    centre stays the centre) and scanned with its own noise.

    Every step draws from one generator seeded by (seed, split, index), in this order:
    the archive is a function of the params alone."""
    if twin >= 0:
        own = np.random.default_rng([seed, 8, index])
        k = int(own.integers(1, 8))
        img = np.rot90(render(seed, split, twin, label, slide), k % 4)
        img = (img[:, ::-1] if k >= 4 else img).astype(np.float32) + own.normal(0.0, 2.0, img.shape).astype(np.float32)
        return np.clip(img + 0.5, 0, 255).astype(np.uint8)
    rng = np.random.default_rng([seed, 2, 0 if split == "train" else 1, index])
    od, lymphoid, fat = _tissue(rng, slide)
    _resident_cells(od, rng, lymphoid, fat)
    if rng.random() < 0.5:  # sinus histiocytes, often in the centre: the hard negatives
        lo, hi = CENTRE
        cy, cx = rng.uniform(lo - 4, hi + 4, 2) if rng.random() < 0.7 else rng.uniform(0, SIZE, 2)
        _histiocytes(od, rng, cy, cx, int(rng.integers(2, 7)), rng.uniform(3.4, 5.0))
    placed = _tumour(od, rng, label, float(slide["grade"]))
    assert placed == bool(label), "generator invariant: label <=> a tumour nucleus in the centre"
    return _scan(od, rng, slide)


def _tissue(rng: np.random.Generator, slide: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The background's stain concentrations, and where the tissue is lymphoid and where fat (each 0..1)."""
    lymphoid = np.clip((_smooth_field(rng, 4) + 2 * float(slide["lymphoid"]) - 1) * 2.0, 0, 1)
    fat = np.clip((_smooth_field(rng, 3) + 2 * float(slide["fat"]) - 1.2) * 2.5, 0, 1) * (1 - lymphoid)
    od = np.zeros((2, SIZE, SIZE), np.float32)
    fibres = np.zeros((SIZE, SIZE), np.float32)
    for _ in range(2):  # wavy collagen strands in two directions, thin where the phase crosses zero
        ang, freq = rng.uniform(0, np.pi), rng.uniform(0.15, 0.45)
        warp = 8 * _smooth_field(rng, 3) + 3 * _smooth_field(rng, 7)
        phase = np.sin((_GRID[:, None] * np.sin(ang) + _GRID[None, :] * np.cos(ang)) * freq + warp)
        fibres = np.maximum(fibres, np.clip(1.0 - np.abs(phase) * rng.uniform(1.2, 2.5), 0, 1) * np.clip(0.3 + _smooth_field(rng, 5), 0, 1))
    od[E] = (0.12 + 0.08 * _smooth_field(rng, 4) + 0.22 * fibres) * (1 - fat) * (1 - 0.4 * lymphoid)
    od[H] = 0.035 + 0.06 * lymphoid + 0.02 * fibres
    if fat.max() > 0.05:  # adipocytes: empty cells, thin membranes along the borders of a Voronoi tiling
        seeds = rng.uniform(-20, SIZE + 20, (int(rng.integers(5, 12)), 2)).astype(np.float32)
        d = np.sort(np.hypot(_GRID[None, :, None] - seeds[:, 0, None, None], _GRID[None, None, :] - seeds[:, 1, None, None]), axis=0)
        membrane = np.clip(1.6 - (d[1] - d[0]), 0, 1)
        od[E] = od[E] * (1 - fat) + fat * 0.3 * membrane
        od[H] = od[H] * (1 - fat)
    return od, lymphoid, fat


def _resident_cells(od: np.ndarray, rng: np.random.Generator, lymphoid: np.ndarray, fat: np.ndarray) -> None:
    """Lymphocytes where the tissue is lymphoid (dense, small, dark, round); a few spindle nuclei elsewhere."""
    n = int(rng.poisson(380))
    ys, xs, u = rng.uniform(0, SIZE, n), rng.uniform(0, SIZE, n), rng.random(n)
    lym, f = lymphoid[ys.astype(int), xs.astype(int)], fat[ys.astype(int), xs.astype(int)]
    is_lym = u < lym
    is_spindle = ~is_lym & (u < lym + 0.05 * (1 - f))
    k = int(is_lym.sum())
    _blobs(od, rng, ys[is_lym], xs[is_lym], rng.uniform(2.1, 3.4, k), rng.uniform(0.85, 1.35, k), 0.16, rng.uniform(1.0, 1.25, k))
    k = int(is_spindle.sum())
    _blobs(od, rng, ys[is_spindle], xs[is_spindle], rng.uniform(1.5, 2.3, k), rng.uniform(0.6, 0.9, k), 0.15, rng.uniform(1.6, 2.6, k))


_REACH = 6  # px: the stencil of one small nucleus, (2 * 6 + 1)^2


def _blobs(od: np.ndarray, rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, r: np.ndarray, h: np.ndarray, e: float, aspect: np.ndarray) -> None:
    """Many small nuclei at once (a stencil each, vectorised): where they overlap the most opaque one's
    coverage counts, and the stains mix by coverage. ``r * aspect`` must stay within :data:`_REACH`."""
    if not len(ys):
        return
    off = np.arange(-_REACH, _REACH + 1, dtype=np.float32)
    iy, ix = np.floor(ys).astype(np.int64), np.floor(xs).astype(np.int64)
    rows, cols = iy[:, None, None] + off[None, :, None].astype(np.int64), ix[:, None, None] + off[None, None, :].astype(np.int64)
    yy, xx = (rows - ys[:, None, None]).astype(np.float32), (cols - xs[:, None, None]).astype(np.float32)
    th = rng.uniform(0, np.pi, len(ys)).astype(np.float32)[:, None, None]
    a, b = (r * aspect).astype(np.float32)[:, None, None], (r / aspect).astype(np.float32)[:, None, None]
    d = np.sqrt(((xx * np.cos(th) + yy * np.sin(th)) / a) ** 2 + ((yy * np.cos(th) - xx * np.sin(th)) / b) ** 2)
    alpha = np.clip((1.0 - d) * 3.0, 0.0, 1.0) * rng.uniform(0.7, 1.0, d.shape).astype(np.float32)
    inside = (rows >= 0) & (rows < SIZE) & (cols >= 0) & (cols < SIZE) & (alpha > 0)
    flat = (rows * SIZE + cols)[inside]
    cover = np.zeros(SIZE * SIZE, np.float32)
    np.maximum.at(cover, flat, alpha[inside])
    weight, stain = np.zeros(SIZE * SIZE, np.float32), np.zeros(SIZE * SIZE, np.float32)
    np.add.at(weight, flat, alpha[inside])
    np.add.at(stain, flat, (alpha * h.astype(np.float32)[:, None, None])[inside])
    cover, target = cover.reshape(SIZE, SIZE), (stain / np.maximum(weight, 1e-6)).reshape(SIZE, SIZE)
    od[H] += cover * (target - od[H])
    od[E] += cover * (e - od[E])


def _histiocytes(od: np.ndarray, rng: np.random.Generator, cy: float, cx: float, n: int, size: float) -> None:
    """Large pale oval nuclei with pink cytoplasm, loosely clustered: as large as a low-grade tumour's."""
    for _ in range(n):
        y, x = cy + rng.normal(0, 7), cx + rng.normal(0, 7)
        _blob(od, rng, y, x, rng.uniform(5, 8), 0.07, 0.22, rng.uniform(1.0, 1.3), soft=1.5)
        _blob(od, rng, y, x, size * rng.uniform(0.85, 1.15), rng.uniform(0.5, 0.85), 0.18, rng.uniform(1.0, 1.4), vesicular=rng.uniform(0.2, 0.5), nucleolus=rng.uniform(0.0, 0.7))


def _tumour_cell(od: np.ndarray, rng: np.random.Generator, y: float, x: float, r: float, grade: float) -> None:
    _blob(od, rng, y, x, r * rng.uniform(1.7, 2.2), 0.1, 0.3, rng.uniform(1.0, 1.3), soft=4.0)  # cytoplasm; a sharp membrane
    _blob(od, rng, y, x, r, rng.uniform(0.5, 0.8) + 0.25 * grade, 0.2, rng.uniform(1.0, 1.25 + 0.4 * grade), vesicular=rng.uniform(0.2, 0.6), nucleolus=rng.uniform(0.3, 1.1) * (0.2 + 0.8 * grade))


def _foci(rng: np.random.Generator, label: int) -> list[tuple[str, float, float]]:
    """Where tumour goes, as (kind, cy, cx): a positive's focus reaching the centre — or, for half, a
    single cell at its edge — plus off-centre foci (in negatives too: the label is about the centre alone), and
    for about a third of the negatives a single cell just outside the centre (a near miss)."""
    lo, hi = CENTRE
    foci: list[tuple[str, float, float]] = []
    if label:
        foci.append(("edge", 0.0, 0.0) if rng.random() < 0.5 else ("centre", rng.uniform(lo - 8, hi + 8), rng.uniform(lo - 8, hi + 8)))
    elif rng.random() < 0.35:
        foci.append(("near", 0.0, 0.0))  # a single tumour cell just outside the centre: a near miss
    for _ in range(int(rng.choice([0, 1, 2], p=[0.5, 0.35, 0.15]))):
        while True:
            cy, cx = rng.uniform(0, SIZE, 2)
            if not _touches_centre(cy, cx, 12.0):
                break
        foci.append(("off", cy, cx))
    return foci


def _tumour(od: np.ndarray, rng: np.random.Generator, label: int, grade: float) -> bool:
    """Draw the tumour foci; whether a tumour nucleus reaches the centre. Nuclear size is a continuum with the
    slide's grade, from histiocyte-like to large and atypical."""
    lo, hi = CENTRE
    placed = False
    for kind, cy, cx in _foci(rng, label):
        if kind in ("edge", "near"):  # one nucleus overlapping the centre by a pixel or two, or missing it by as much
            r = rng.uniform(2.8, 3.6) + 0.8 * grade
            t, off = rng.uniform(lo, hi), r - rng.uniform(0.5, 1.5) if kind == "edge" else r + rng.uniform(0.5, 2.0)
            y, x = [(lo - off, t), (hi - 1 + off, t), (t, lo - off), (t, hi - 1 + off)][int(rng.integers(0, 4))]
            _tumour_cell(od, rng, y, x, r, grade)
            placed |= kind == "edge"
            continue
        spread = rng.uniform(5.0, 13.0)
        for j in range(int(rng.integers(1, 9))):
            r = (2.9 + 2.6 * grade) * rng.uniform(0.8, 1.25)
            if kind == "centre" and j == 0:
                y, x = rng.uniform(lo - r + 1.5, hi - 1 + r - 1.5, 2)
            else:
                y, x = cy + rng.normal(0, spread), cx + rng.normal(0, spread)
            if kind == "off" and _touches_centre(y, x, r + 1.0):
                continue  # no tumour nucleus of an off-centre focus may reach the centre
            placed |= kind == "centre" and _touches_centre(y, x, r)
            _tumour_cell(od, rng, y, x, r, grade)
    return placed


def _unit(v: tuple[float, float, float]) -> np.ndarray:
    a = np.asarray(v, np.float32)
    return a / np.linalg.norm(a)


def _scan(od: np.ndarray, rng: np.random.Generator, slide: pd.Series) -> np.ndarray:
    """Concentrations -> RGB through Beer-Lambert with the hospital's stain vectors and the slide's strengths
    and tint; then the scanner: focus, sensor noise, compression."""
    pal = _HOSPITALS[int(slide["hospital"])]
    h_vec = _unit(pal["h"]) + np.float32(slide["tint"]) * np.array([1, -1, 0], np.float32)
    dens = od[H, ..., None] * np.float32(pal["hs"] * slide["stain_h"]) * h_vec + od[E, ..., None] * np.float32(pal["es"] * slide["stain_e"]) * _unit(pal["e"])
    img = np.asarray(pal["bg"], np.float32) * np.exp(-LN10 * dens)
    if slide["blur"] > 0:
        img = _blur(img, float(slide["blur"]))
    img += rng.normal(0.0, 3.0, img.shape).astype(np.float32)
    if slide["jpeg"] > 0:
        img = _blocky(img, float(slide["jpeg"]))
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (an out-of-focus scan)."""
    r = np.arange(-2, 3, dtype=np.float32)
    k = np.exp(-0.5 * (r / sigma) ** 2)
    k /= k.sum()
    pad = np.pad(img, ((2, 2), (2, 2), (0, 0)), mode="reflect")
    rows = sum(k[i] * pad[i : i + SIZE, :, :] for i in range(5))
    return sum(k[i] * rows[:, i : i + SIZE, :] for i in range(5))


_DCT = np.array([[np.sqrt((1 if k == 0 else 2) / 8) * np.cos((2 * n + 1) * k * np.pi / 16) for n in range(8)] for k in range(8)])
_QUANT = 1.0 + np.add.outer(np.arange(8), np.arange(8)) / 2.0  # coarser for higher frequencies, as JPEG's tables


def _blocky(img: np.ndarray, step: float) -> np.ndarray:
    """JPEG-like loss: each channel's 8x8 blocks to the DCT, coefficients rounded to a step growing with
    frequency, and back (float64 matrix products: the same bytes on any machine)."""
    x = img.astype(np.float64).reshape(12, 8, 12, 8, 3).transpose(0, 2, 4, 1, 3)  # (block row, block col, channel, 8, 8)
    q = step * _QUANT
    coef = np.round((_DCT @ (x - 128.0) @ _DCT.T) / q) * q
    return (_DCT.T @ coef @ _DCT + 128.0).transpose(0, 3, 1, 4, 2).reshape(SIZE, SIZE, 3).astype(np.float32)


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
        return _render_member(self.p, split, i, int(row["drawn"]), self.slides.loc[int(row["slide"])], self.planted, self.src if split == "train" else {}, int(row["twin"]))


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
        src_pixels[src_i] = render(p.seed, "train", src_i, int(t.train.loc[src_i, "drawn"]), slides.loc[int(tr.loc[src_i, "slide"])], int(t.train.loc[src_i, "twin"]))
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


def _render_member(p: DemoParams, split: str, i: int, label: int, slide: pd.Series, planted: dict | None, src_pixels: dict[int, np.ndarray], twin: int = -1) -> bytes:
    if planted is not None:
        if split == "train":
            if i in planted["dark"]:
                return encode_patch(np.zeros((SIZE, SIZE, 3), np.uint8))
            if i in planted["bright"]:
                return _near_white(p.seed, 5, i)
            if i in planted["truncated"]:
                return _truncated(render(p.seed, split, i, label, slide, twin), 2)
            if i in planted["wrong_size"]:
                return encode_patch(render(p.seed, split, i, label, slide, twin)[:, :95])
            copy_i, src_i = planted["conflict"]
            if i in (copy_i, src_i):  # the conflicting duplicate and its source: the same pixels
                return encode_patch(src_pixels[src_i])
        else:
            if i in planted["test_bright"]:
                return _near_white(p.seed, 6, i)
            if i in planted["test_truncated"]:
                return _truncated(render(p.seed, split, i, label, slide, twin), 3)
    return encode_patch(render(p.seed, split, i, label, slide, twin))


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
