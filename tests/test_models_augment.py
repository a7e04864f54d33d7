"""Backbones build and step; augmentation and TTA views are what they claim."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hcd.data.augment import AugmentConfig, augment_batch, crop_batch, dihedral, tta_views
from hcd.errors import HcdError
from hcd.model.factory import build_model


@pytest.mark.parametrize("name", ["cnn", "resnet18", "efficientnet_b0", "densenet169", "mobilenetv2_100", "vgg16_bn", "seresnet50"])
def test_each_backbone_family_builds_and_takes_a_step_on_96px(name):
    torch.manual_seed(0)
    model = build_model(name)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.rand(2, 3, 96, 96), torch.tensor([[0.0], [1.0]])
    model.train()
    out = model(x)
    assert out.shape == (2, 1)
    loss = F.binary_cross_entropy_with_logits(out, y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


def test_unknown_backbone_is_a_one_line_error():
    with pytest.raises(HcdError, match="unknown backbone 'resnet19'"):
        build_model("resnet19")


def test_dihedral_views_are_exactly_the_8_symmetries():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    views = [dihedral(x, k) for k in range(8)]
    flat = {tuple(v.flatten().tolist()) for v in views}
    assert len(flat) == 8, "eight distinct views"
    # closed under composition: applying any symmetry to any view gives a view
    for v in views:
        for k in range(8):
            assert tuple(dihedral(v, k).flatten().tolist()) in flat
    # and they are rotations/flips: the multiset of values is unchanged
    assert all(sorted(v.flatten().tolist()) == list(range(16)) for v in views)


def test_tta_views_are_view_major_and_start_with_the_identity():
    x = torch.rand(3, 3, 8, 8)
    v = tta_views(x, 8)
    assert v.shape == (24, 3, 8, 8)
    torch.testing.assert_close(v[:3], x)
    for k in range(8):
        torch.testing.assert_close(v[3 * k : 3 * k + 3], dihedral(x, k))
    assert tta_views(x, 2).shape[0] == 6 and tta_views(x, 4).shape[0] == 12


def test_crop_with_shift_equals_per_image_slicing():
    x = torch.rand(5, 3, 96, 96)
    shift = torch.tensor([[0, 0], [2, -2], [-3, 1], [40, 40], [-40, 0]])
    got = crop_batch(x, 48, shift)
    for i in range(5):
        top = min(max(24 + int(shift[i, 0]), 0), 48)
        left = min(max(24 + int(shift[i, 1]), 0), 48)
        torch.testing.assert_close(got[i], x[i, :, top : top + 48, left : left + 48])


def test_batched_augmentation_equals_a_per_image_reference():
    """Same random draws, applied image by image with plain ops, give the same batch."""
    cfg = AugmentConfig(dihedral=True, shift_px=3, brightness=0.1, contrast=0.1)
    x = torch.rand(6, 3, 96, 96)
    got = augment_batch(x.clone(), cfg, 64, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)  # replay the draws in augment_batch's order
    shift = torch.randint(-3, 4, (6, 2), generator=g)
    ks = torch.randint(0, 8, (6,), generator=g)
    bright = torch.rand(6, 1, 1, 1, generator=g) * 0.2 + 0.9
    contrast = torch.rand(6, 1, 1, 1, generator=g) * 0.2 + 0.9
    for i in range(6):
        img = x[i : i + 1]
        top, left = 16 + int(shift[i, 0]), 16 + int(shift[i, 1])
        img = img[:, :, top : top + 64, left : left + 64]
        img = dihedral(img, int(ks[i])) * bright[i]
        m = img.mean()
        img = ((img - m) * contrast[i] + m).clamp(0, 1)
        torch.testing.assert_close(got[i : i + 1], img)


def test_hed_jitter_with_identity_draws_changes_nothing():
    from hcd.data.augment import hed_jitter

    x = torch.rand(2, 3, 16, 16) * 0.9 + 0.05
    torch.testing.assert_close(hed_jitter(x, torch.ones(2, 3), torch.zeros(2, 3)), x, atol=1e-4, rtol=1e-4)


def test_local_pretrained_weights_load_and_a_code_carrying_pickle_is_refused(tmp_path):
    import pickle

    from safetensors.torch import save_file

    torch.manual_seed(1)
    donor = build_model("cnn")
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(tmp_path / "w.safetensors"))
    model = build_model("cnn", pretrained=str(tmp_path / "w.safetensors"))
    for k, v in donor.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v)

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"state_dict": Evil()}, protocol=2))  # torch.load's own protocol: no warning, same refusal
    with pytest.raises(HcdError, match="not a loadable weights file"):
        build_model("cnn", pretrained=str(tmp_path / "evil.pt"))
    assert not marker.exists(), "loading must never run code from the file"


@pytest.mark.parametrize("cfg", [AugmentConfig(), AugmentConfig(dihedral=True, shift_px=3, brightness=0.1, contrast=0.1), AugmentConfig(dihedral=True, rotate_deg=10.0, shift_px=2, hed_jitter=0.05), AugmentConfig(dihedral=False, shift_px=0, brightness=0.0, contrast=0.0)])
@pytest.mark.parametrize("crop", [32, 64, 96])
def test_uint8_patches_augment_exactly_as_their_float_copy(cfg, crop):
    """The training path gathers the crop from the packed uint8 pixels and makes only it float: the same batch, bit
    for bit, as augmenting the whole float image with the same draws."""
    x8 = torch.randint(0, 256, (7, 96, 96, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    got = augment_batch(x8, cfg, crop, torch.Generator().manual_seed(9))
    ref = augment_batch(x8.permute(0, 3, 1, 2).float().div_(255.0), cfg, crop, torch.Generator().manual_seed(9))
    assert got.shape == (7, 3, crop, crop) and torch.equal(got, ref)


def test_the_geometry_gather_is_the_dihedral_of_the_shifted_crop():
    from hcd.data.augment import take, window_index

    x = torch.rand(8, 3, 96, 96)
    shift = torch.randint(-5, 6, (8, 2), generator=torch.Generator().manual_seed(4))
    ks = torch.arange(8)
    rows, cols = window_index(96, 48, shift, ks, x.device)
    got = take(x.permute(0, 2, 3, 1), rows, cols)
    for i in range(8):
        top, left = 24 + int(shift[i, 0]), 24 + int(shift[i, 1])
        assert torch.equal(got[i], dihedral(x[i, :, top : top + 48, left : left + 48], i))
