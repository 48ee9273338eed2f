"""The native KBA kernels: build and cache, failures and the fallback, layouts and the layout copies."""

from __future__ import annotations

import pytest
import torch

import kbnet.ops.kernel_basis as kba_module
from kbnet.ops import kba, native
from tests.helpers.kba import require_compiler, require_native


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """A build into an empty cache; afterwards the library of the real cache is loaded again."""
    monkeypatch.setenv("KBNET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(kba_module, "_warned_native", False)
    native._library.cache_clear()
    yield tmp_path / "cache"
    native._library.cache_clear()


def small_case(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(1, 8, 5, 20, generator=gen, dtype=dtype), torch.randn(1, 4, 5, 20, generator=gen, dtype=dtype),
            torch.randn(1, 4, 8 * 4 * 9, generator=gen, dtype=dtype), torch.randn(1, 4, 8, generator=gen, dtype=dtype))


def test_builds_once_into_the_cache(fresh_build):
    require_compiler()
    assert native.available(), native.unavailable_reason()
    built = list(fresh_build.glob("kbnet_cpu-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    native._library.cache_clear()
    assert native.available()
    assert built[0].stat().st_mtime_ns == stamp
    assert list(fresh_build.iterdir()) == built  # no temporary files left behind


def test_compile_error_is_reported_and_auto_falls_back(fresh_build, monkeypatch, tmp_path):
    broken = tmp_path / "kba_cpu.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCES", (broken, native.SOURCES[1]))
    require_compiler()
    assert not native.available()
    assert "kba_cpu.cpp" in native.unavailable_reason() and "failed" in native.unavailable_reason()
    x, att, w, b = small_case()
    with pytest.warns(RuntimeWarning, match="native kernels are unavailable"):
        out = kba(x, att, w, b, 3, 2)
    assert torch.allclose(out, kba(x, att, w, b, 3, 2, impl="reference"), atol=1e-5)
    with pytest.raises(RuntimeError, match="native implementation is unavailable.*failed"):
        kba(x, att, w, b, 3, 2, impl="native")


def test_missing_compiler_is_named(fresh_build, monkeypatch):
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    assert not native.available()
    assert "no C++ compiler" in native.unavailable_reason()


@pytest.mark.parametrize("kind", ["SOURCES", "HEADERS"])
def test_missing_source_is_named(fresh_build, monkeypatch, tmp_path, kind):
    monkeypatch.setattr(native, kind, (*getattr(native, kind)[1:], tmp_path / "gone.cpp"))
    require_compiler()
    assert "gone.cpp is missing" in native.unavailable_reason()


def test_supports_names_what_it_needs():
    x = torch.zeros(1, 8, 4, 4)
    assert native.supports(x, 2) and native.supports(x, 1)
    assert not native.supports(torch.zeros(1, 9, 4, 4), 3)
    assert native.supports(x.bfloat16(), 2) == (torch.bfloat16 in native.native_dtypes())
    assert native.supports(x.bfloat16(), 2, torch.float32)
    assert not native.supports(x.to("meta"), 2)


@pytest.fixture
def lib():
    require_native()


@pytest.mark.parametrize("width, layout", [(7, "_Columns"), (8, "_PaddedRows"), (40, "_PaddedRows")])
def test_narrow_images_use_columns(lib, width, layout):
    assert type(native._layout(torch.zeros(1, 8, 3, width), 3, 2)).__name__ == layout


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape", [(2, 19, 5, 23), (1, 8, 8, 8), (1, 3, 1, 1)])
def test_pack_unpack_round_trip(lib, dtype, memory_format, shape):
    """Planes of any image and back (bf16 images: into float32 planes, and rounded back to bf16)."""
    image = torch.randn(shape).to(dtype).contiguous(memory_format=memory_format)
    b, c, h, w = shape
    row, base = w + 3, 2 * (w + 3) + 1
    plane = base + h * row + 5
    if dtype == torch.bfloat16:
        planes = native._pack_converted(image, plane, base, row, pairs=False)
    else:
        planes = native._pack(image, plane, base, row)
    expected = torch.zeros(b, c, plane, dtype=planes.dtype)
    expected[:, :, base:base + h * row].view(b, c, h, row)[..., :w] = image
    assert torch.equal(planes, expected)
    if dtype == torch.bfloat16:
        back = native._unpack_to_bf16(planes, base, row, h, w, memory_format)
    else:
        back = native._unpack(planes, base, row, h, w, memory_format)
    assert back.dtype == dtype and torch.equal(back, image)
    assert back.is_contiguous(memory_format=memory_format)


def test_unpack_to_bf16_rounds_to_nearest_even(lib):
    planes = torch.randn(1, 19, 12 * 13)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        image = native._unpack_to_bf16(planes, 0, 13, 12, 13, memory_format)
        assert torch.equal(image, planes.view(1, 19, 12, 13).bfloat16())


def test_channels_last_bf16_pairs_are_the_converting_pack(lib):
    """Channels-last bf16 already holds the channel pairs: its 32-bit transposing copy gives the converting pack."""
    x = torch.randn(2, 12, 7, 19).bfloat16()
    lay = native._layout(x, 3, 3)
    expected = lay.pair_neighbourhoods(x).clone()  # NCHW: the converting pack
    assert torch.equal(lay.pair_neighbourhoods(x.contiguous(memory_format=torch.channels_last)), expected)
