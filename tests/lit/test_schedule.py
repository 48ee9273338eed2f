"""The LR schedule and the progressive stages against the official numbers (300k iterations: constant
3e-4 for 92k, then a cosine to 1e-6; stages of 92k/64k/48k/36k/36k/24k)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from kbnet.lit.schedule import ProgressiveSchedule, cosine_restart_lr, lr_lambda, scaled_boundaries

PAPER = 300_000
PERIODS = (92_000, 208_000)
ETA_MINS = (3e-4, 1e-6)
DENOISE = {"iters": [92000, 64000, 48000, 36000, 36000, 24000], "patch_sizes": [128, 160, 192, 256, 320, 384],
           "batch_sizes": [8, 5, 3, 2, 1, 1]}
RESTORE = {"iters": [92000, 64000, 48000, 36000, 36000, 24000], "patch_sizes": [128, 160, 192, 256, 320, 320],
           "batch_sizes": [8, 5, 3, 1, 1, 1]}


def official_lr(iteration: int) -> float:
    """The spec's closed form: constant to 92k, then 1e-6 + 0.5 (3e-4 - 1e-6)(1 + cos(pi (e - 92k) / 208k)),
    at scheduler position e = iteration - 1."""
    e = iteration - 1
    if e <= 92_000:
        return 3e-4
    return 1e-6 + 0.5 * (3e-4 - 1e-6) * (1 + math.cos(math.pi * (e - 92_000) / 208_000))


@pytest.mark.parametrize(("iteration", "expected"),
                         [(150_000, 2.462e-4), (196_000, 1.505e-4), (250_000, 4.164e-5), (300_000, 1.0e-6)])
def test_lr_matches_the_spec_sample_values(iteration: int, expected: float) -> None:
    lr = 3e-4 * lr_lambda(PAPER, PERIODS, 3e-4, ETA_MINS)(iteration - 1)
    assert lr == pytest.approx(expected, rel=2e-3)
    assert lr == pytest.approx(official_lr(iteration), rel=1e-12)


def test_lr_is_constant_through_the_first_period_then_decays() -> None:
    schedule = lr_lambda(PAPER, PERIODS, 3e-4, ETA_MINS)
    assert [schedule(s) for s in (0, 1, 50_000, 92_000)] == [1.0, 1.0, 1.0, 1.0]
    assert schedule(92_001) < 1.0
    values = [schedule(s) for s in range(92_000, 300_001, 1000)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert schedule(400_000) * 3e-4 == pytest.approx(1e-6)


def test_lr_schedule_keeps_its_shape_on_short_runs() -> None:
    schedule = lr_lambda(3000, PERIODS, 3e-4, ETA_MINS)
    assert schedule(920) == 1.0 and schedule(921) < 1.0
    assert 3e-4 * schedule(1500 - 1) == pytest.approx(official_lr(150_000), rel=2e-3)
    assert 3e-4 * schedule(2999) == pytest.approx(1e-6, rel=1e-2)


def test_lambda_lr_steps_follow_the_official_positions() -> None:
    """LambdaLR stepped once per optimizer step gives step k the official iteration k + 1's LR."""
    max_steps = 30
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=3e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(max_steps, PERIODS, 3e-4, ETA_MINS))
    boundaries = scaled_boundaries(PERIODS, max_steps)
    for step in range(max_steps):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(cosine_restart_lr(step, boundaries, 3e-4, ETA_MINS))
        optimizer.step()
        scheduler.step()


def test_boundaries_are_the_paper_ones_at_300k_and_scale() -> None:
    assert scaled_boundaries(DENOISE["iters"], PAPER) == [92_000, 156_000, 204_000, 240_000, 276_000, 300_000]
    assert scaled_boundaries(DENOISE["iters"], 3000) == [920, 1560, 2040, 2400, 2760, 3000]
    with pytest.raises(ValueError, match="max_steps"):
        scaled_boundaries(DENOISE["iters"], -1)
    with pytest.raises(ValueError, match="positive integers"):
        scaled_boundaries([10, 0], 100)


@pytest.mark.parametrize(("iteration", "stage", "patch", "batch"), [
    (1, 0, 128, 8), (92_000, 0, 128, 8), (92_001, 1, 160, 5), (156_000, 1, 160, 5), (156_001, 2, 192, 3),
    (204_001, 3, 256, 2), (240_001, 4, 320, 1), (276_001, 5, 384, 1), (300_000, 5, 384, 1),
])
def test_denoising_stages_at_sampled_iterations(iteration: int, stage: int, patch: int, batch: int) -> None:
    current = ProgressiveSchedule(**DENOISE, max_steps=PAPER).stage(iteration - 1, loader_batch=8)
    assert (current.index, current.patch_size, current.batch_size) == (stage, patch, batch)


def test_deraining_stages_differ_where_the_spec_says() -> None:
    schedule = ProgressiveSchedule(**RESTORE, max_steps=PAPER)
    assert schedule.stage(210_000, 8).batch_size == 1
    assert schedule.stage(299_999, 8).patch_size == 320


def test_stage_batches_scale_to_the_per_device_loader_batch() -> None:
    schedule = ProgressiveSchedule(**DENOISE, max_steps=PAPER)
    assert schedule.device_batch_sizes(64) == [64, 40, 24, 16, 8, 8]
    assert schedule.device_batch_sizes(8) == [8, 5, 3, 2, 1, 1]
    with pytest.raises(ValueError, match="multiple of 8"):
        schedule.device_batch_sizes(4)


def test_progressive_table_is_validated() -> None:
    with pytest.raises(ValueError, match="one entry per stage"):
        ProgressiveSchedule([1, 2], [8], [8, 4], max_steps=10)
    with pytest.raises(ValueError, match="largest"):
        ProgressiveSchedule([1, 2], [8, 16], [4, 8], max_steps=10)
