"""Progressive sub-crops stay aligned and follow the official sampling; mixup blends pairs consistently."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kbnet.lit.augment import mixup, progressive_crop, step_rng


def coordinate_batch(batch: int = 8, size: int = 24) -> torch.Tensor:
    """Channel 0 = row, channel 1 = column, channel 2 = sample index: every pixel says where it came from."""
    rows = torch.arange(size).view(1, size, 1).expand(batch, size, size)
    cols = torch.arange(size).view(1, 1, size).expand(batch, size, size)
    samples = torch.arange(batch).view(batch, 1, 1).expand(batch, size, size)
    return torch.stack([rows, cols, samples], dim=1).float()


def test_crop_keeps_input_and_target_aligned_with_one_offset_for_the_batch() -> None:
    inp = coordinate_batch()
    target = 1000 - 3 * inp  # an invertible pixelwise map: alignment means target == f(input) after the crop
    out_in, out_target = progressive_crop(inp, target, batch_size=3, patch_size=10, rng=step_rng(1, 0, 5))
    assert out_in.shape == out_target.shape == (3, 3, 10, 10)
    torch.testing.assert_close(out_target, 1000 - 3 * out_in)
    tops, lefts = out_in[:, 0, 0, 0], out_in[:, 1, 0, 0]
    assert torch.all(tops == tops[0]) and torch.all(lefts == lefts[0])
    assert 0 <= tops[0] <= 24 - 10 and 0 <= lefts[0] <= 24 - 10
    torch.testing.assert_close(out_in[0, 0, :, 0], tops[0] + torch.arange(10).float())
    samples = out_in[:, 2, 0, 0].long().tolist()
    assert len(set(samples)) == 3


def test_crop_matches_the_official_draws() -> None:
    """random.sample of the indices, then x0 = int((h - p) * random()), y0 = int((w - p) * random())."""
    inp = coordinate_batch(batch=8, size=40)
    out, _ = progressive_crop(inp, inp.clone(), batch_size=5, patch_size=16, rng=step_rng(7, 1, 123))
    rng = step_rng(7, 1, 123)
    index = rng.choice(8, size=5, replace=False)
    top, left = int(24 * rng.random()), int(24 * rng.random())
    assert out[:, 2, 0, 0].long().tolist() == index.tolist()
    assert (out[0, 0, 0, 0].item(), out[0, 1, 0, 0].item()) == (top, left)


def test_full_stage_returns_the_batch_unchanged() -> None:
    inp = coordinate_batch()
    out_in, out_target = progressive_crop(inp, inp + 1, batch_size=8, patch_size=24, rng=step_rng(0, 0, 0))
    assert torch.equal(out_in, inp) and torch.equal(out_target, inp + 1)


def test_crop_errors_name_the_setting_to_change() -> None:
    inp = coordinate_batch(batch=4, size=16)
    with pytest.raises(ValueError, match="data.patch_size"):
        progressive_crop(inp, inp, batch_size=4, patch_size=32, rng=step_rng(0, 0, 0))
    with pytest.raises(ValueError, match="global_batch_size"):
        progressive_crop(inp, inp, batch_size=5, patch_size=8, rng=step_rng(0, 0, 0))
    with pytest.raises(ValueError, match="differ in shape"):
        progressive_crop(inp, inp[:, :, :8], batch_size=2, patch_size=8, rng=step_rng(0, 0, 0))


def test_step_rng_is_reproducible_and_differs_per_rank_and_step() -> None:
    draw = [step_rng(100, r, s).random() for r, s in ((0, 0), (0, 0), (1, 0), (0, 1))]
    assert draw[0] == draw[1] and len({draw[0], draw[2], draw[3]}) == 3


def test_mixup_blends_input_and_target_with_one_lam_and_permutation() -> None:
    torch.manual_seed(0)
    inp = torch.rand(6, 3, 8, 8)
    target = 2 * inp + 0.5  # mixup is linear, so the pixelwise relation must survive it
    rng = np.random.default_rng(3)
    out_in, out_target = mixup(inp, target, prob=1.0, beta=1.2, rng=rng)
    torch.testing.assert_close(out_target, 2 * out_in + 0.5)
    assert not torch.allclose(out_in, inp)
    rng = np.random.default_rng(3)
    rng.random()
    lam, perm = rng.beta(1.2, 1.2), rng.permutation(6)
    torch.testing.assert_close(out_in, lam * inp + (1 - lam) * inp[perm])


def test_mixup_probability_and_single_sample() -> None:
    inp = torch.rand(4, 3, 8, 8)
    assert mixup(inp, inp, prob=0.0, beta=1.2, rng=np.random.default_rng(0))[0] is inp
    single = inp[:1]
    assert mixup(single, single, prob=1.0, beta=1.2, rng=np.random.default_rng(0))[0] is single
    applied = [mixup(inp, inp, 0.5, 1.2, np.random.default_rng(s))[0] is not inp for s in range(400)]
    assert 0.4 < np.mean(applied) < 0.6
    with pytest.raises(ValueError, match="probability"):
        mixup(inp, inp, prob=1.5, beta=1.2, rng=np.random.default_rng(0))
