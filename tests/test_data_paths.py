"""The fast data paths yield exactly the batches of the simple one, for the same seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hcd.data.batches import PackedBatches, Preprocess


@pytest.fixture
def packed(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (300, 96, 96, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    rows = np.random.default_rng(1).permutation(300)[:217]  # an unsorted selection, as a split gives
    return np.load(tmp_path / "x.npy", mmap_mode="r"), rows, (rows % 2).astype(np.float32)


def batches(src, seed=5, bs=32):
    return [(xb.cpu(), yb.cpu()) for xb, yb in src.batches(bs, torch.Generator().manual_seed(seed), drop_last=True)]


@pytest.mark.parametrize("mode", ["host", "stream", "device"])
def test_every_mode_yields_the_reference_batches(packed, mode):
    x, rows, labels = packed
    ref = batches(PackedBatches(np.asarray(x), rows, labels, mode="host"))
    got = batches(PackedBatches(x, rows, labels, mode=mode))
    assert len(got) == len(ref) == 217 // 32
    order = torch.randperm(217, generator=torch.Generator().manual_seed(5)).numpy()
    for k, ((gx, gy), (rx, ry)) in enumerate(zip(got, ref)):
        torch.testing.assert_close(gx, rx, rtol=0, atol=0)
        torch.testing.assert_close(gy, ry, rtol=0, atol=0)
        idx = order[32 * k : 32 * k + 32]
        np.testing.assert_array_equal(gx.numpy(), np.asarray(x)[rows[idx]])  # the right rows, in order


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_resident_batches_equal_memmap_streaming(packed):
    x, rows, labels = packed
    gpu = PackedBatches(x, rows, labels, device="cuda")
    assert gpu.mode == "device"
    stream = PackedBatches(x, rows, labels, device="cuda", mode="stream")
    for (gx, gy), (sx, sy) in zip(batches(gpu), batches(stream)):
        torch.testing.assert_close(gx, sx, rtol=0, atol=0)
        torch.testing.assert_close(gy, sy, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_preprocessing_matches_cpu():
    xb = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (8, 96, 96, 3), dtype=np.uint8))
    prep = Preprocess(64, 128, (0.7, 0.55, 0.7), (0.24, 0.28, 0.22))
    torch.testing.assert_close(prep(xb, torch.device("cuda")).cpu(), prep(xb, torch.device("cpu")), atol=1e-5, rtol=1e-5)
