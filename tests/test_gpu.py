"""On a CUDA GPU (skipped elsewhere): the training hot loop and TTA prediction never make the host wait.

``torch.cuda.set_sync_debug_mode("error")`` turns every synchronising call — ``.item()``,
``float(tensor)``, ``nonzero()`` on the device, a device-to-host copy — into an error, so a
synchronisation added to the loop later fails here on the first GPU run. The read-backs hcd
makes on purpose (once per epoch, once per prediction) happen outside the measured block.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hcd.data.augment import AugmentConfig
from hcd.data.batches import PackedBatches, Preprocess
from hcd.model.factory import build_model
from hcd.model.inference import probs_on_device
from hcd.runtime.loop import Trainer, run_steps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("mode", ["device", "host"])
@pytest.mark.parametrize("backbone", ["cnn", "resnet18"])
def test_hot_loop_and_tta_make_no_host_sync(backbone, mode):
    dev = torch.device("cuda")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (256, 96, 96, 3), dtype=np.uint8)
    y = (np.arange(256) % 2).astype(np.float32)
    src = PackedBatches(x, np.arange(256), y, device=dev, mode=mode)
    model = build_model(backbone).to(dev).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    prep = Preprocess(64, None, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
    aug = AugmentConfig(dihedral=True, rotate_deg=5.0, shift_px=2, brightness=0.1, contrast=0.1, hed_jitter=0.05)
    t = Trainer(model, model, opt, sched, prep, aug, torch.Generator().manual_seed(0), torch.Generator().manual_seed(1), 32, dev, backbone)
    run_steps(t, src, 0, max_steps=2, progress=False)  # warm-up: cuDNN plans, allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        r = run_steps(t, src, 1, max_steps=6, progress=False)
        probs = probs_on_device(model, PackedBatches(x, np.arange(64), device=dev, mode=mode), prep, dev, 32, 8)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert r.seen == 6 * 32 and int(r.first_bad) == -1 and np.isfinite(float(r.losses)) and len(r.lrs) == 6
    assert probs.shape == (64,) and torch.isfinite(probs).all()
