"""Inference machinery: reflect padding, blended and official tiling, ×8 self-ensemble, memory planning, loading."""

from __future__ import annotations

import io
import itertools
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kbnet.errors import MissingFileError
from kbnet.inference import (
    Restorer,
    blended_forward,
    dihedral,
    dihedral_inverse,
    forward_peak_bytes,
    load_model,
    model_channels,
    model_from_checkpoint,
    model_size_multiple,
    official_tiled_forward,
    plan_tile,
    profile_model,
    self_ensemble,
    window_starts,
)
from kbnet.inference import restorer as restorer_module
from kbnet.inference.memory import RUNTIME_BYTES, SAFETY_FACTOR, MemoryProfile, host_bytes, quick_upper_bound
from kbnet.inference.tiling import official_pad, window_weights
from kbnet.models import WeightLoadError, load_weights, read_checkpoint
from kbnet.models.padding import pad_to_multiple, reflect_pad
from kbnet.ops import native
from kbnet.rundir import checkpoint_step
from tests.helpers.checkpoints import outputs_equal, save_official_checkpoint, save_project_checkpoint, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: one thread avoids OpenMP spin-waits


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


class LocalNet(nn.Module):
    """Three 3x3 convolutions: every output pixel depends on the input within 3 pixels (receptive radius 3)."""

    radius = 3

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.body = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 8, 3, padding=1),
                                  nn.GELU(), nn.Conv2d(8, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.body(x)


# ------------------------------------------------------------------------------------------------ padding
@pytest.mark.parametrize("pads", [(0, 3, 0, 5), (2, 2, 4, 4), (36, 36, 52, 52), (1, 0, 0, 1)])
def test_reflect_pad_equals_torch_reflect_where_torch_can_pad(pads):
    x = rand(1, 3, 37, 53)
    top, bottom, left, right = pads
    assert torch.equal(reflect_pad(x, *pads), F.pad(x, (left, right, top, bottom), mode="reflect"))


def test_reflect_pad_wider_than_the_image_mirrors_repeatedly_like_numpy():
    x = rand(1, 2, 5, 7)
    expected = np.pad(x.numpy(), ((0, 0), (0, 0), (11, 13), (20, 3)), mode="reflect")
    assert np.array_equal(reflect_pad(x, 11, 13, 20, 3).numpy(), expected)
    one_row = rand(1, 1, 1, 4)
    assert torch.equal(reflect_pad(one_row, 2, 2, 0, 0), one_row.expand(1, 1, 5, 4))


def test_pad_to_multiple_is_the_official_right_bottom_reflect_pad():
    x = rand(1, 3, 37, 50)
    padded = pad_to_multiple(x, 8)
    assert padded.shape[-2:] == (40, 56)
    assert torch.equal(padded, F.pad(x, (0, 6, 0, 3), mode="reflect"))
    assert pad_to_multiple(rand(1, 3, 16, 24), 8).shape[-2:] == (16, 24)


def test_pad_to_multiple_zero_pads_and_pads_images_smaller_than_the_pad():
    x = rand(1, 3, 37, 50)
    assert torch.equal(pad_to_multiple(x, 16, "constant"), F.pad(x, (0, 14, 0, 11)))
    small = rand(1, 2, 3, 5)
    assert torch.equal(pad_to_multiple(small, 8), reflect_pad(small, 0, 5, 0, 3))
    assert pad_to_multiple(small, 8, "constant")[..., 3:, :].abs().max() == 0
    with pytest.raises(ValueError, match="pad mode must be one of constant, reflect, got 'replicate'"):
        pad_to_multiple(x, 8, "replicate")
    with pytest.raises(ValueError, match="pad multiple must be >= 1"):
        pad_to_multiple(x, 0)


# ------------------------------------------------------------------------------------------------ tiling
@pytest.mark.parametrize(("length", "tile", "stride"), [(100, 32, 24), (64, 64, 48), (65, 64, 48), (10, 32, 24)])
def test_window_starts_cover_the_axis_with_the_last_window_flush(length, tile, stride):
    starts = window_starts(length, tile, stride)
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s:s + tile] = True
    assert covered.all()
    assert starts[0] == 0 and starts[-1] == max(length - tile, 0)
    assert all(0 < b - a <= stride for a, b in itertools.pairwise(starts))


def test_blend_window_is_zero_next_to_inner_edges_and_one_at_image_borders():
    w = window_weights(64, 16, taper_start=True, taper_end=False)
    assert torch.all(w[:4] == 0) and torch.all((w[4:12] > 0) & (w[4:12] < 1)) and torch.all(w[12:] == 1)
    assert torch.all(window_weights(64, 16, False, False) == 1)


@pytest.mark.parametrize(("size", "tile", "overlap"), [((150, 130), 64, 16), ((97, 203), 48, 20), ((64, 64), 40, 12)])
def test_blended_tiling_equals_whole_image_for_a_network_within_the_margin(size, tile, overlap):
    net = LocalNet()
    assert net.radius <= overlap // 4
    x = rand(1, 3, *size)
    calls = []
    tiled = blended_forward(net, x, tile, overlap, on_tile=lambda done, total: calls.append((done, total)))
    assert len(calls) > 1 and calls[-1][0] == calls[-1][1]
    torch.testing.assert_close(tiled, net(x), rtol=0, atol=1e-5)


def test_blended_tiling_rejects_tiles_without_an_untapered_centre():
    with pytest.raises(ValueError, match="twice the overlap"):
        blended_forward(LocalNet(), rand(1, 3, 80, 80), 32, 16)


def test_official_tiling_of_a_pointwise_network_is_exact():
    net = nn.Conv2d(3, 3, 1)
    x = rand(1, 3, 150, 170)
    with torch.no_grad():
        torch.testing.assert_close(official_tiled_forward(net, x, tile=64, padding=8), net(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("size", [(150, 170), (40, 150)])
def test_official_tiling_equals_the_network_on_the_reflect_padded_image(size):
    """With a receptive radius within ``padding``, centre-crop write-back reproduces one pass over the padded image,
    including the wider pad of an image whose short side is below the tile (40 < 64)."""
    net = LocalNet()
    x = rand(1, 3, *size)
    pad = official_pad(*size, tile=64, padding=8)
    assert pad == (8 if min(size) >= 64 else 64 - 40 + 8)
    whole = net(F.pad(x, (pad,) * 4, mode="reflect"))[..., pad:pad + size[0], pad:pad + size[1]]
    torch.testing.assert_close(official_tiled_forward(net, x, tile=64, padding=8), whole, rtol=0, atol=1e-5)


def official_patch_forward_loops(x: torch.Tensor, forward, skip: int, padding: int) -> torch.Tensor:
    """The official ``patch_forward`` loop, restated literally (no de-duplication of the flush window)."""
    short = min(x.shape[-2:])
    pd = skip - short + padding if short < skip else padding
    padded = F.pad(x, (pd, pd, pd, pd), mode="reflect")
    out = torch.zeros_like(padded)
    height, width = padded.shape[-2:]
    shift = skip - 2 * padding
    for i in np.arange(0, height, shift):
        for j in np.arange(0, width, shift):
            h0, h1, w0, w1 = i, i + skip, j, j + skip
            if h1 > height:
                h0, h1 = height - skip, height
            if w1 > width:
                w0, w1 = width - skip, width
            result = forward(padded[..., h0:h1, w0:w1])
            out[..., h0 + padding:h1 - padding, w0 + padding:w1 - padding] = result[..., padding:-padding,
                                                                                    padding:-padding]
    return out[..., pd:-pd, pd:-pd]


def test_official_tiling_overwrites_overlaps_in_the_official_window_order():
    """A network that fills each tile with one value (its top-left input pixel) exposes which window wrote where."""

    def stamp(tile: torch.Tensor) -> torch.Tensor:
        return tile[..., :1, :1].expand_as(tile).clone()

    x = rand(1, 1, 150, 230)
    expected = official_patch_forward_loops(x, stamp, skip=64, padding=8)
    assert torch.equal(official_tiled_forward(stamp, x, tile=64, padding=8), expected)


def test_official_tiling_runs_an_image_within_one_tile_whole():
    net = LocalNet()
    x = rand(1, 3, 50, 60)
    assert torch.equal(official_tiled_forward(net, x, tile=64, padding=8), net(x))


# ------------------------------------------------------------------------------------------- self-ensemble
def test_dihedral_transforms_are_eight_distinct_invertible_maps():
    x = rand(1, 1, 5, 7)
    images = [dihedral(x, i) for i in range(8)]
    assert len({tuple(img.flatten().tolist()) for img in images}) == 8
    for i, img in enumerate(images):
        assert torch.equal(dihedral_inverse(img, i), x)


def test_self_ensemble_of_the_identity_is_the_identity():
    x = rand(1, 3, 9, 13)
    torch.testing.assert_close(self_ensemble(lambda t: t, x), x, rtol=0, atol=1e-6)


def test_self_ensemble_is_the_mean_of_the_eight_dihedral_passes():
    net = LocalNet(channels=1)
    x = rand(1, 1, 12, 17)
    image = x[0, 0].numpy()
    outputs = []
    for flip in (False, True):
        for k in range(4):
            t = np.rot90(image, k)
            t = np.fliplr(t) if flip else t
            y = net(torch.from_numpy(t.copy())[None, None])[0, 0].numpy()
            y = np.fliplr(y) if flip else y
            outputs.append(np.rot90(y, -k))
    expected = np.mean(outputs, axis=0)
    np.testing.assert_allclose(self_ensemble(net, x)[0, 0].numpy(), expected, rtol=0, atol=1e-6)


def test_self_ensemble_is_equivariant_for_any_network():
    net = LocalNet()
    x = rand(1, 3, 11, 16)
    base = self_ensemble(net, x)
    for i in range(8):
        torch.testing.assert_close(self_ensemble(net, dihedral(x, i)), dihedral(base, i), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ memory
class TwoConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_forward_peak_bytes_counts_the_live_activations_exactly():
    # input (3 ch) + first conv output (8 ch) + second conv output (3 ch), float32, all alive at the second conv
    assert forward_peak_bytes(TwoConvs(), 3, 20, 30) == (3 + 8 + 3) * 4 * 20 * 30


def test_memory_profile_probes_on_meta_and_leaves_the_model_untouched():
    net = TwoConvs()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    profile = profile_model(net, 3, probe_sizes=(16, 32))
    assert profile.bytes_per_pixel == pytest.approx(56) and profile.fixed_bytes == pytest.approx(0, abs=1e-6)
    assert profile.weight_bytes == sum(p.numel() * 4 for p in net.parameters())
    assert all(torch.equal(before[k], v) and v.device.type == "cpu" for k, v in net.state_dict().items())


def test_memory_profile_of_a_kbnet_grows_with_the_image():
    profile = profile_model(tiny_model(), 3, probe_sizes=(64, 96))
    assert profile.bytes_per_pixel > 100
    assert profile.peak(512, 512) > profile.peak(256, 256)


@pytest.mark.parametrize("name", ["kbnet_s_tiny", "kbnet_l_tiny"])
def test_quick_upper_bound_exceeds_the_planned_peak(name):
    net = tiny_model(name)
    weights = sum(p.numel() * 4 for p in net.parameters())
    for size in ((24, 32), (96, 128)):
        measured = MemoryProfile(weights, forward_peak_bytes(net, 3, *size), 0.0).peak(*size)
        assert quick_upper_bound(net, *size) > measured


def test_plan_tile_uses_the_whole_image_when_it_fits_and_the_largest_tile_otherwise():
    profile = MemoryProfile(weight_bytes=1000, fixed_bytes=0, bytes_per_pixel=100)
    base = profile.peak(0, 0)
    assert base == SAFETY_FACTOR * 1000 + RUNTIME_BYTES
    assert plan_tile(profile, 100, 100, budget=base + 2e6, multiple=16, overlap=16) is None
    tile = plan_tile(profile, 1000, 1000, budget=base + 2e6, multiple=16, overlap=16)
    assert tile is not None and tile % 16 == 0 and tile > 32
    assert profile.peak(tile, tile) <= base + 2e6 < profile.peak(tile + 16, tile + 16)
    assert plan_tile(profile, 1000, 1000, budget=base + 4e6, multiple=16, overlap=16, reserved=2e6) == tile
    with pytest.raises(MemoryError, match="too small"):
        plan_tile(profile, 1000, 1000, budget=base + 1000, multiple=16, overlap=16)


# ------------------------------------------------------------------------------------------------ restorer
def test_restorer_whole_image_is_the_plain_network_output():
    net = tiny_model()
    x = rand(1, 3, 45, 70)
    with torch.no_grad():
        expected = net(x)
    restorer = Restorer(net, tile=None)
    assert torch.equal(restorer(x), expected)
    assert restorer.multiple == 8 and restorer.channels == 3


def test_restorer_auto_tiling_keeps_a_fitting_image_whole_and_tiles_a_large_one(monkeypatch):
    monkeypatch.setattr(restorer_module, "memory_in_use", lambda device: 10**8)
    net = tiny_model()
    x = rand(1, 3, 72, 88)
    whole = Restorer(net, tile=None)(x)
    roomy = Restorer(net, tile="auto", tile_overlap=16, max_memory_bytes=2**34)
    assert torch.equal(roomy(x), whole)
    profile = roomy.memory_profile()
    budget = int(10**8 + profile.peak(48, 48) + host_bytes(3, 72, 88)) + 1024
    tight = Restorer(net, tile="auto", tile_overlap=16, max_memory_bytes=budget)
    tight._profile = profile
    calls = []
    out = tight(x, on_tile=lambda done, total: calls.append(total))
    assert tight.tile_size(72, 88) == 48 and calls[-1] == 6  # rows start at 0, 24; columns at 0, 32, 40
    assert torch.equal(out, Restorer(net, tile=48, tile_overlap=16)(x))


def test_restorer_with_a_tile_at_least_the_image_does_not_tile():
    net = tiny_model()
    x = rand(1, 3, 40, 56)
    assert torch.equal(Restorer(net, tile=64, tile_overlap=16)(x), Restorer(net, tile=None)(x))


def test_restorer_pads_to_the_protocol_multiple_then_crops():
    net = tiny_model("kbnet_l_tiny")
    x = rand(1, 3, 37, 50)
    with torch.no_grad():
        expected = net(F.pad(x, (0, 6, 0, 3), mode="reflect"))[..., :37, :50]
    torch.testing.assert_close(Restorer(net, tile=None, pad_multiple=8)(x), expected, rtol=0, atol=1e-6)


def test_memory_probe_of_a_bf16_model_is_its_float32_pass():
    """The meta-device probe runs a bfloat16 model (a bf16 restorer's) as float32: no dtype clash without autocast,
    and an upper bound on the bf16 pass."""
    net = tiny_model()
    expected = forward_peak_bytes(net, 3, 32, 32)
    assert forward_peak_bytes(net.to(torch.bfloat16), 3, 32, 32) == expected


def test_restorer_self_ensemble_averages_the_eight_passes():
    net = tiny_model()
    x = rand(1, 3, 24, 32)
    with torch.no_grad():
        expected = self_ensemble(net, x)
    torch.testing.assert_close(Restorer(net, tile=None, self_ensemble=True)(x), expected, rtol=0, atol=1e-6)


def test_restorer_rejects_bad_settings_and_inputs(monkeypatch):
    net = tiny_model()
    with monkeypatch.context() as mp:  # a CPU without bf16 kernels
        mp.setattr(native, "native_dtypes", lambda: native.FLOAT_DTYPES)
        with pytest.raises(ValueError, match="AVX512_BF16"):
            Restorer(net, precision="bf16")
    with pytest.raises(ValueError, match="fixed tile size"):
        Restorer(net, tile="auto", tile_mode="official")
    with pytest.raises(ValueError, match="3-channel"):
        Restorer(net, tile=None)(rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="twice the overlap"):
        Restorer(net, tile=40, tile_overlap=32)(rand(1, 3, 100, 100))


# ------------------------------------------------------------------------------------------------ loading
def test_project_checkpoint_rebuilds_its_model_and_prefers_the_ema_weights(tmp_path):
    path = tmp_path / "last.ckpt"
    net = save_project_checkpoint(path, "kbnet_s_tiny", seed=1, width=8)
    loaded = model_from_checkpoint(path, weights="net")
    assert loaded.name == "kbnet_s_tiny" and outputs_equal(loaded.model, net)
    with_ema = tmp_path / "ema.ckpt"
    save_project_checkpoint(with_ema, "kbnet_s_tiny", seed=1, ema_seed=2, width=8)
    assert "EMA" in model_from_checkpoint(with_ema).source
    assert outputs_equal(model_from_checkpoint(with_ema).model, tiny_model("kbnet_s_tiny", 2, width=8))
    assert outputs_equal(model_from_checkpoint(with_ema, weights="net").model, net)
    with pytest.raises(WeightLoadError, match="kept no EMA"):
        model_from_checkpoint(path, weights="ema")


def test_project_checkpoint_for_another_preset_is_refused(tmp_path):
    path = tmp_path / "last.ckpt"
    save_project_checkpoint(path, "kbnet_s_tiny")
    with pytest.raises(WeightLoadError, match=r"holds a 'kbnet_s_tiny' model, not 'kbnet_l_tiny'"):
        load_model(path, preset="kbnet_l_tiny")


@pytest.mark.parametrize(("wrapper", "data_parallel"), [("params", False), ("net", True), (None, False)])
def test_official_files_load_with_their_preset(tmp_path, wrapper, data_parallel):
    path = tmp_path / "official.pth"
    net = save_official_checkpoint(path, "kbnet_l_tiny", wrapper=wrapper, data_parallel=data_parallel)
    loaded = load_model(path, preset="kbnet_l_tiny")
    assert "official" in loaded.source and outputs_equal(loaded.model, net)


def test_official_file_needs_its_preset_and_the_right_one(tmp_path):
    path = tmp_path / "official.pth"
    save_official_checkpoint(path, "kbnet_s_tiny")
    with pytest.raises(WeightLoadError, match="--model"):
        load_model(path)
    with pytest.raises(WeightLoadError, match=str(path)):
        load_model(path, preset="kbnet_l_tiny")


BAD_FILES = {
    "missing": (None, MissingFileError, "checkpoint not found"),
    "corrupt": (lambda path: path.write_bytes(b"not a checkpoint"), WeightLoadError, "cannot read checkpoint"),
    "truncated": (lambda path: path.write_bytes(torch_bytes({"w": torch.ones(64)})[:200]), WeightLoadError,
                  "cannot read checkpoint"),
    "zip, not PyTorch": (lambda path: zipfile.ZipFile(path, "w").close(), WeightLoadError, "cannot read checkpoint"),
    "not weights": (lambda path: torch.save([1, 2, 3], path), WeightLoadError, "got list|not a checkpoint"),
}
ENTRY_POINTS = {
    "load_weights": lambda path: load_weights(tiny_model("kbnet_s_tiny"), path),
    "load_model": lambda path: load_model(path),
    "load_model with preset": lambda path: load_model(path, preset="kbnet_s_tiny"),
}


def torch_bytes(content: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(content, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_unusable_files_raise_one_error_class_naming_the_file_through_every_entry_point(tmp_path, kind, entry):
    write, error, message = BAD_FILES[kind]
    path = tmp_path / "weights.pth"
    if write is not None:
        write(path)
    with pytest.raises(error, match=message) as info:
        ENTRY_POINTS[entry](path)
    assert type(info.value) is error and str(path) in str(info.value)


def test_missing_safetensors_and_run_checkpoints_go_through_the_same_reader(tmp_path):
    for entry in ENTRY_POINTS.values():
        with pytest.raises(MissingFileError, match="checkpoint not found: .*weights.safetensors"):
            entry(tmp_path / "weights.safetensors")
    path = tmp_path / "last.ckpt"
    save_project_checkpoint(path)
    assert checkpoint_step(path) == 4
    with pytest.raises(MissingFileError, match="missing.ckpt"):
        checkpoint_step(tmp_path / "missing.ckpt")
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightLoadError, match="cannot read checkpoint .*last.ckpt"):
        checkpoint_step(path)


def test_legacy_format_files_are_read_without_memory_mapping(tmp_path):
    path = tmp_path / "legacy.pth"
    net = tiny_model("kbnet_s_tiny", seed=1)
    torch.save({"params": net.state_dict()}, path, _use_new_zipfile_serialization=False)
    assert set(read_checkpoint(path)) == {"params"}
    assert outputs_equal(load_model(path, preset="kbnet_s_tiny").model, net)


def test_model_channels_and_size_multiple():
    assert model_channels(tiny_model("kbnet_s_tiny", img_channel=1)) == 1
    assert model_size_multiple(tiny_model("kbnet_s_tiny")) == 8
    assert model_size_multiple(tiny_model("kbnet_s_tiny", enc_blk_nums=(1, 1), dec_blk_nums=(1, 1))) == 4
    assert model_size_multiple(tiny_model("kbnet_l_tiny")) == 8
    stated = LocalNet()
    stated.size_multiple = 32
    assert model_size_multiple(stated) == 32
    assert model_size_multiple(nn.Conv2d(3, 3, 1)) == 1
