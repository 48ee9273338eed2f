"""The fused CPU kernels of KBA (``kba_cpu.cpp``) and of the channel LayerNorm (``layer_norm_cpu.cpp``, used by
``kbnet.ops.layer_norm``): one library, built on first use, cached, called through ``ctypes``.

Why this way: a torch C++ extension would need the torch headers (a minute of compilation) or a build step in
``pip install`` (which would pull a CUDA torch into the isolated build env). The kernels need no torch API, so they
are a plain shared library compiled in a few seconds with the system C++ compiler, ``-march=native`` and OpenMP.
Its OpenMP runtime resolves to the ``libgomp.so.1`` torch has already loaded, so both share one thread pool.
The library is cached under ``$KBNET_CACHE_DIR`` (default ``~/.cache/kbnet``), keyed by a hash of the sources, the
compiler, the flags and the CPU. When no compiler works, ``available()`` is False and ``unavailable_reason()``
says why; ``kbnet.ops.kba`` then uses its pure-PyTorch implementation, and ``kbnet.ops.layer_norm`` PyTorch's.

The instruction set follows the build target (``instruction_sets()``): 64-byte vectors where it has AVX-512, else
32-byte (AVX2); with AVX512_BF16 also bf16 kernels (``vdpbf16ps``, float32 sums), so ``native_dtypes()`` gains
bfloat16 and bf16 autocast computes KBA in bf16 (``compute_dtype``); with AMX-BF16 (and Linux granting the tile
state) the bf16 kernels of KBNet's group sizes run their basis products on AMX tiles (``amx_disabled`` turns that
off, for comparisons). ``$KBNET_NATIVE_EMULATE_AVX512=1`` builds all of that code for any x86-64 CPU with its
intrinsics emulated (``isa.h``), so the tests run it on CPUs without those instructions.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

SOURCES = (Path(__file__).with_name("kba_cpu.cpp"), Path(__file__).with_name("layer_norm_cpu.cpp"))
HEADERS = tuple(Path(__file__).with_name(name) for name in ("bf16.h", "isa.h", "avx512_emulated.h"))
"""Included by the sources: part of the library's cache key."""
FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
MARCH_ENV = "KBNET_NATIVE_MARCH"
"""Environment variable naming the ``-march`` target (default ``native``): the kernels pick their instruction set
(AVX-512 with or without BF16, else AVX2) from it at compile time, so e.g. ``haswell`` builds the AVX2 code."""
EMULATE_ENV = "KBNET_NATIVE_EMULATE_AVX512"
"""Environment variable: ``1`` builds the AVX-512, AVX512_BF16 and AMX-BF16 kernels for any x86-64 CPU, their
intrinsics computed in plain vector code (``isa.h``), so the tests run that code where the CPU lacks it. Slow:
``instruction_sets()`` ends with "emulated" and the benchmarks print it."""
GROUP_CHANNELS = (1, 2, 4, 8)
"""Channels per group with a compiled register blocking; other sizes use the PyTorch implementation."""
FLOAT_DTYPES = (torch.float32, torch.float64)
"""The dtypes every build handles; bfloat16 is added where the CPU has AVX512_BF16 (see ``native_dtypes``)."""
BF16_GROUP_CHANNELS = (2, 4, 8)
"""The bf16 kernels pair consecutive in-channels of a group, so they need an even group size."""


class NativeBuildError(RuntimeError):
    """The KBA kernels could not be compiled or loaded."""


def cache_dir() -> Path:
    if "KBNET_CACHE_DIR" in os.environ:
        return Path(os.environ["KBNET_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kbnet"


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    raise NativeBuildError("no C++ compiler found (tried $CXX, c++, g++, clang++)")


def _cpu_signature() -> str:
    """The CPU's feature flags, so a cache shared between machines never loads code built for another CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _flags() -> tuple[str, ...]:
    emulate = os.environ.get(EMULATE_ENV, "0")
    if emulate not in ("0", "1"):
        raise NativeBuildError(f"environment variable {EMULATE_ENV} must be 0 or 1, not {emulate!r}")
    flags = (*FLAGS, f"-march={os.environ.get(MARCH_ENV, 'native')}")
    # -Wno-psabi: 64-byte vectors passed between inline functions of a target without AVX-512 are no ABI concern.
    return (*flags, "-DKBNET_EMULATED_AVX512", "-Wno-psabi") if emulate == "1" else flags


def _build() -> Path:
    compiler = _compiler()
    flags = _flags()
    for source in (*SOURCES, *HEADERS):
        if not source.is_file():
            raise NativeBuildError(f"kernel source {source} is missing from the installed package")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(b"\0".join([*(source.read_bytes() for source in (*SOURCES, *HEADERS)),
                                     " ".join(flags).encode(), version.encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    target = cache_dir() / f"kbnet_cpu-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run([compiler, *flags, *map(str, SOURCES), "-o", str(built)], capture_output=True,
                                text=True)
        if result.returncode:
            names = " and ".join(str(source) for source in SOURCES)
            raise NativeBuildError(f"compiling {names} with {compiler} failed:\n{result.stderr[-2000:]}")
        os.replace(built, target)  # atomic: concurrent builders never see a half-written library
    return target


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.kba_isa.argtypes, lib.kba_isa.restype = [], i64
    if lib.kba_isa() & 2:
        lib.kba_forward_bf16.argtypes = [ptr] * 4 + [i64] + [ptr] * 2 + [i64] * 9 + [i32]
        lib.kba_grad_att_bf16.argtypes = [ptr] * 4 + [i64] + [ptr] * 2 + [i64] * 9 + [i32]
        lib.kba_grad_x_w_bf16.argtypes = [ptr] * 5 + [i64] + [ptr] * 4 + [i64] * 8 + [i32]
        lib.kba_amx.argtypes, lib.kba_amx.restype = [i64], i64
    lib.kba_pack_convert.argtypes = [ptr] + [i64] * 10 + [ptr] + [i64] * 3 + [i32]
    lib.kba_unpack_to_bf16.argtypes = [ptr] + [i64] * 3 + [ptr] + [i64] * 8 + [i32]
    for suffix in ("f32", "f64"):
        getattr(lib, f"kba_forward_{suffix}").argtypes = [ptr] * 6 + [i64] * 9 + [i32]
        getattr(lib, f"kba_grad_att_{suffix}").argtypes = [ptr] * 6 + [i64] * 9 + [i32]
        getattr(lib, f"kba_grad_x_w_{suffix}").argtypes = [ptr] * 7 + [i64] * 8 + [i32]
        getattr(lib, f"kba_unfold_{suffix}").argtypes = [ptr] + [i64] * 9 + [ptr, i64, i32]
        getattr(lib, f"kba_fold_{suffix}").argtypes = [ptr, i64, i64, ptr] + [i64] * 8 + [i32]
        getattr(lib, f"kba_alignment_{suffix}").argtypes = []
        getattr(lib, f"kba_alignment_{suffix}").restype = i64
        getattr(lib, f"kba_pack_{suffix}").argtypes = [ptr] + [i64] * 8 + [ptr] + [i64] * 3 + [i32]
        getattr(lib, f"kba_unpack_{suffix}").argtypes = [ptr] + [i64] * 3 + [ptr] + [i64] * 8 + [i32]
    for suffix in ("f32", "bf16"):
        getattr(lib, f"layer_norm_forward_{suffix}").argtypes = [ptr] * 6 + [i64, i64, ctypes.c_double, i32]
        getattr(lib, f"layer_norm_backward_{suffix}").argtypes = [ptr] * 8 + [i64, i64, i32]
    return lib


@functools.cache
def _library() -> ctypes.CDLL | NativeBuildError:
    try:
        return _bind(ctypes.CDLL(str(_build())))
    except (NativeBuildError, OSError) as err:
        return err if isinstance(err, NativeBuildError) else NativeBuildError(f"loading the KBA kernels failed: {err}")


def available() -> bool:
    """Whether the native kernels are built and loadable on this machine (builds them on the first call)."""
    return not isinstance(_library(), NativeBuildError)


def unavailable_reason() -> str | None:
    lib = _library()
    return str(lib) if isinstance(lib, NativeBuildError) else None


def _lib() -> ctypes.CDLL:
    lib = _library()
    if isinstance(lib, NativeBuildError):
        raise lib
    return lib


def instruction_sets() -> tuple[str, ...]:
    """The vector instruction sets the built kernels use (empty when they are unavailable)."""
    lib = _library()
    if isinstance(lib, NativeBuildError):
        return ()
    isa = lib.kba_isa()
    amx = bool(isa & 2) and bool(lib.kba_amx(-1))
    sets = ("AVX-512",) * bool(isa & 1) + ("AVX512_BF16",) * bool(isa & 2) + ("AMX-BF16",) * amx or ("AVX2",)
    return (*sets, "emulated") if isa & 4 else sets


@contextlib.contextmanager
def amx_disabled() -> Iterator[None]:
    """Run the bf16 kernels on ``vdpbf16ps`` instead of AMX tiles (the tests and benchmarks compare both paths on a
    CPU with AMX); a no-op where the kernels have no AMX code."""
    lib = _library()
    if isinstance(lib, NativeBuildError) or not lib.kba_isa() & 2:
        yield
        return
    previous = lib.kba_amx(-1)
    lib.kba_amx(0)
    try:
        yield
    finally:
        lib.kba_amx(previous)


def native_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes the native kernels compute in on this machine: float32 and float64, and bfloat16 (float32
    accumulation) where the build has the AVX512_BF16 kernels."""
    return (*FLOAT_DTYPES, torch.bfloat16) if "AVX512_BF16" in instruction_sets() else FLOAT_DTYPES


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the native kernels compute a call in whose operands autocast would give ``dtype``: ``dtype``
    itself where they have kernels for it, else float32."""
    return dtype if dtype in native_dtypes() else torch.float32


def supports(x: torch.Tensor, groups: int, dtype: torch.dtype | None = None) -> bool:
    """Whether the native kernels handle this call (CPU tensor, a dtype of ``native_dtypes``, compiled group size);
    ``dtype`` overrides the dtype of ``x`` (for operands about to be cast)."""
    dtype = x.dtype if dtype is None else dtype
    if x.device.type != "cpu" or dtype not in (*FLOAT_DTYPES, torch.bfloat16):
        return False
    gc = x.shape[1] // groups
    if dtype == torch.bfloat16:
        return gc in BF16_GROUP_CHANNELS and dtype in native_dtypes()
    return gc in GROUP_CHANNELS


def _pack(image: torch.Tensor, plane: int, base: int, row: int) -> torch.Tensor:
    """(B, C, H, W) of any strides to (B, C, plane): pixel (y, x) at base + y·row + x, zeros elsewhere."""
    b, c, h, w = image.shape
    planes = image.new_empty(b, c, plane)
    getattr(_lib(), f"kba_pack_{_suffix(image.dtype)}")(image.data_ptr(), b, c, h, w, *image.stride(),
                                                          planes.data_ptr(), plane, base, row, _copy_threads(planes))
    return planes


def _unpack(planes: torch.Tensor, base: int, row: int, h: int, w: int, memory_format: torch.memory_format
            ) -> torch.Tensor:
    """The inverse of ``_pack``: a new (B, C, h, w) tensor in ``memory_format``."""
    image = torch.empty(planes.shape[0], planes.shape[1], h, w, dtype=planes.dtype, memory_format=memory_format)
    getattr(_lib(), f"kba_unpack_{_suffix(planes.dtype)}")(planes.data_ptr(), planes.shape[-1], base, row,
                                                            image.data_ptr(), *image.shape, *image.stride(),
                                                            _copy_threads(planes))
    return image


def _pack_converted(image: torch.Tensor, plane: int, base: int, row: int, pairs: bool) -> torch.Tensor:
    """``_pack`` of a float32 or bfloat16 image into float32 planes (B, C, plane), or with ``pairs`` into the bf16
    pair planes of the bf16 kernels (B, ⌈C/2⌉, plane) (see ``_Layout.pairs``)."""
    b, c, h, w = image.shape
    planes = torch.empty(b, -(-c // 2) if pairs else c, plane, dtype=torch.int32 if pairs else torch.float32)
    _lib().kba_pack_convert(image.data_ptr(), int(image.dtype == torch.bfloat16), int(pairs), b, c, h, w,
                            *image.stride(), planes.data_ptr(), plane, base, row, _copy_threads(planes))
    return planes


def _unpack_to_bf16(planes: torch.Tensor, base: int, row: int, h: int, w: int, memory_format: torch.memory_format
                    ) -> torch.Tensor:
    """``_unpack`` of float32 planes into a new bfloat16 image (rounded to nearest even)."""
    image = torch.empty(planes.shape[0], planes.shape[1], h, w, dtype=torch.bfloat16, memory_format=memory_format)
    _lib().kba_unpack_to_bf16(planes.data_ptr(), planes.shape[-1], base, row, image.data_ptr(), *image.shape,
                              *image.stride(), _copy_threads(planes))
    return image


def _copy_threads(t: torch.Tensor) -> int:
    return max(1, min(torch.get_num_threads(), t.numel() // 2**16))


class _Layout:
    """Where the kernels find each pixel and each tap of its neighbourhood (see ``kba_cpu.cpp``).

    Positions are a flat axis of length ``length`` (a multiple of the kernels' vector length) on which pixel (y, x)
    sits at y·``row`` + x; ``offsets[j]`` is the distance from a position to its tap j inside one channel group,
    ``chan_stride`` the distance between channels of the ``neighbourhoods`` buffer.
    """

    length: int
    row: int
    chan_stride: int
    offsets: torch.Tensor
    accumulates = True
    """Whether taps of different positions share gradient values in the ``neighbourhoods`` buffer."""

    def __init__(self, x: torch.Tensor, kernel_size: int, groups: int) -> None:
        self.b, self.c, self.h, self.w = x.shape
        self.k = kernel_size
        self.gc = self.c // groups
        self.align = getattr(_lib(), f"kba_alignment_{_suffix(_accumulator(x.dtype))}")()
        if x.dtype == torch.bfloat16:
            self.align *= 2  # whole pairs of AMX tile rows: the tile kernels of grad_w take 32 positions a step

    def _round(self, n: int) -> int:
        return -(-n // self.align) * self.align

    def positions(self, t: torch.Tensor) -> torch.Tensor:
        """(B, M, H, W) per-pixel values to (B, M, length), zero where there is no pixel; bfloat16 values become
        float32 (the dtype the kernels accumulate in)."""
        if t.dtype == torch.bfloat16:
            return _pack_converted(t, self.length, 0, self.row, pairs=False)
        return _pack(t, self.length, 0, self.row)

    def pair_positions(self, t: torch.Tensor) -> torch.Tensor:
        """(B, M, H, W) per-pixel values rounded to bf16 as (B, ⌈M/2⌉, length) pairs of consecutive channels (the
        even one in the low half; an odd M pairs the last channel with zeros)."""
        return _pack_converted(t, self.length, 0, self.row, pairs=True)

    def pixels(self, tp: torch.Tensor, memory_format: torch.memory_format, dtype: torch.dtype | None = None
               ) -> torch.Tensor:
        """The (B, M, H, W) pixels of a (B, M, length) tensor, as a new tensor in ``memory_format`` and ``dtype``
        (default: that of ``tp``; bfloat16 from float32)."""
        if dtype == torch.bfloat16:
            return _unpack_to_bf16(tp, 0, self.row, self.h, self.w, memory_format)
        return _unpack(tp, 0, self.row, self.h, self.w, memory_format)

    def neighbourhoods(self, x: torch.Tensor) -> torch.Tensor:
        """The buffer the float kernels read the taps from (the bf16 kernels read ``pair_neighbourhoods``)."""
        raise NotImplementedError

    def pair_neighbourhoods(self, x: torch.Tensor) -> torch.Tensor:
        """The buffer the bf16 kernels read the pair taps from (see ``pairs``)."""
        return self.pairs(self.neighbourhoods(x))

    def input_grad(self, grad_buffer: torch.Tensor, memory_format: torch.memory_format, dtype: torch.dtype
                   ) -> torch.Tensor:
        """The gradient w.r.t. x, in ``dtype``, from the gradient w.r.t. the ``neighbourhoods`` buffer."""
        raise NotImplementedError

    def dims(self, nset: int) -> list[int]:
        return [self.b, self.c, nset, self.k, self.gc, self.chan_stride, self.length]

    def pairs(self, xp: torch.Tensor) -> torch.Tensor:
        """The bf16 kernels' form of a float32 ``neighbourhoods`` buffer: consecutive channel pairs of each group
        interleaved, (B, C/2, chan_stride) 32-bit values each holding two bf16 (the even channel in the low half)."""
        pairs = xp.view(self.b, self.c // 2, 2, self.chan_stride).transpose(2, 3).to(torch.bfloat16)
        return pairs.contiguous().view(torch.int32).squeeze(-1)

    def pair_offsets(self) -> torch.Tensor:
        """The offsets of the pair taps (s2, ky, kx) in the ``pair_neighbourhoods`` buffer: those of the even
        channels, with the channel distance halved."""
        taps = self.offsets[:self.k**2]
        return (torch.arange(self.gc // 2)[:, None] * self.chan_stride + taps[None, :]).flatten()


class _PaddedRows(_Layout):
    """The zero-padded image flattened row by row: pixel (y, x) is position y·Wp + x and its tap (ky, kx) sits at
    + ky·Wp + kx, so no copy per tap is needed; the k-1 padding columns per row are positions without a pixel."""

    def __init__(self, x: torch.Tensor, kernel_size: int, groups: int) -> None:
        super().__init__(x, kernel_size, groups)
        self.row = self.w + kernel_size - 1
        self.length = self._round(self.h * self.row)
        self.chan_stride = self.length + (kernel_size - 1) * (self.row + 1)
        self.base = (kernel_size // 2) * (self.row + 1)  # where pixel (0, 0) sits in the padded image
        k = torch.arange(kernel_size)
        taps = (k[:, None] * self.row + k[None, :]).flatten()
        self.offsets = (torch.arange(self.gc)[:, None] * self.chan_stride + taps[None, :]).flatten()

    def neighbourhoods(self, x: torch.Tensor) -> torch.Tensor:
        return _pack(x, self.chan_stride, self.base, self.row)

    def pair_neighbourhoods(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and self.c % 2 == 0 and _memory_format(x) == torch.channels_last:
            # Channels-last bf16 already holds the channel pairs: a transposing copy of 32-bit values.
            pairs = x.permute(0, 2, 3, 1).view(torch.float32).permute(0, 3, 1, 2)
            return _pack(pairs, self.chan_stride, self.base, self.row).view(torch.int32)
        return _pack_converted(x, self.chan_stride, self.base, self.row, pairs=True)

    def input_grad(self, grad_buffer: torch.Tensor, memory_format: torch.memory_format, dtype: torch.dtype
                   ) -> torch.Tensor:
        if dtype == torch.bfloat16:
            return _unpack_to_bf16(grad_buffer, self.base, self.row, self.h, self.w, memory_format)
        return _unpack(grad_buffer, self.base, self.row, self.h, self.w, memory_format)


class _Columns(_Layout):
    """Unfolded neighbourhoods (im2col): no position without a pixel, at k² times the input's memory; used for
    narrow images, where padded rows would waste a large share of the work."""

    def __init__(self, x: torch.Tensor, kernel_size: int, groups: int) -> None:
        super().__init__(x, kernel_size, groups)
        self.row = self.w
        self.length = self._round(self.h * self.w)
        self.chan_stride = kernel_size**2 * self.length
        self.offsets = torch.arange(self.gc * kernel_size**2) * self.length

    accumulates = False

    def neighbourhoods(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() if x.dtype == torch.bfloat16 else x
        cols = x.new_empty(self.b, self.c * self.k**2, self.length)
        getattr(_lib(), f"kba_unfold_{_suffix(x.dtype)}")(x.data_ptr(), *x.shape, *x.stride(), self.k,
                                                           cols.data_ptr(), self.length, _copy_threads(cols))
        return cols

    def input_grad(self, grad_buffer: torch.Tensor, memory_format: torch.memory_format, dtype: torch.dtype
                   ) -> torch.Tensor:
        grad = torch.empty(self.b, self.c, self.h, self.w, dtype=grad_buffer.dtype, memory_format=memory_format)
        getattr(_lib(), f"kba_fold_{_suffix(grad.dtype)}")(grad_buffer.data_ptr(), self.length, self.k,
                                                            grad.data_ptr(), *grad.shape, *grad.stride(),
                                                            _copy_threads(grad_buffer))
        return grad.to(dtype)


def _layout(x: torch.Tensor, kernel_size: int, groups: int) -> _Layout:
    """Padded rows unless they would add more than 1/4 positions without a pixel: columns take k² times the
    input's memory, padded rows about once."""
    narrow = 4 * (kernel_size - 1) > x.shape[-1]
    return (_Columns if narrow else _PaddedRows)(x, kernel_size, groups)


def _suffix(dtype: torch.dtype) -> str:
    return {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16"}[dtype]


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels accumulate, lay out positions and return results in."""
    return torch.float32 if dtype == torch.bfloat16 else dtype


def _bf16_bases(weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The bases as the bf16 kernels read them (contiguous float32 or bfloat16, rounded to bf16 as they are read)
    and the flag that says which."""
    weight = weight.contiguous() if weight.dtype == torch.bfloat16 else weight.float().contiguous()
    return weight, int(weight.dtype == torch.bfloat16)


def _position_pairs(ap: torch.Tensor) -> torch.Tensor:
    """Coefficients (B, N, length) of bf16 values as (B, length/2, Np) pairs of consecutive positions (the even one
    in the low half), the bases zero-padded to Np, a multiple of 16 (one vector of the bf16 kernels)."""
    b, n, length = ap.shape
    pairs = ap.view(b, n, length // 2, 2).to(torch.bfloat16).view(torch.int32).squeeze(-1)
    return torch.nn.functional.pad(pairs.transpose(1, 2), (0, -n % 16)).contiguous()


MACS_PER_THREAD = 2**22
"""Work below which one more thread costs more in start-up and barrier than it saves."""


def _call(name: str, lay: _Layout, nset: int, dtype: torch.dtype, *args) -> None:
    values = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
    macs = lay.b * lay.length * lay.c * lay.gc * lay.k**2 * nset
    threads = max(1, min(torch.get_num_threads(), macs // MACS_PER_THREAD))
    status = getattr(_lib(), f"{name}_{_suffix(dtype)}")(*values, threads)
    if status:
        raise ValueError(f"{name}: the native kernels do not support this group size")


def _check_supported(x: torch.Tensor, groups: int) -> None:
    if not supports(x, groups):
        raise ValueError(f"native KBA needs a CPU tensor of dtype {native_dtypes()} and {GROUP_CHANNELS} channels "
                         f"per group ({BF16_GROUP_CHANNELS} for bfloat16); got {x.device.type} {x.dtype} with "
                         f"{x.shape[1] // groups} channels per group")


POSITIONS_PER_TASK = 1024
"""Positions of one plane per task: enough to reuse a group's bases from cache, few enough to balance threads."""


def _split_groups(lay: _Layout, groups: int) -> tuple[int, int]:
    """(position ranges, group blocks) of the forward and grad_att tasks. A task runs the groups of its block one
    after the other on the same positions, whose coefficients (forward) or partial sums (grad_att, one per block)
    then stay in cache, so the groups are split into blocks only when the positions alone give too few tasks."""
    parts = max(1, -(-lay.length // POSITIONS_PER_TASK))
    return parts, min(groups, max(1, -(-4 * torch.get_num_threads() // (lay.b * parts))))


def forward(x: torch.Tensor, att: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, kernel_size: int,
            groups: int) -> torch.Tensor:
    """KBA output (B, C, H, W) in the dtype and memory format of ``x``; operands share a float dtype, or ``x`` and
    ``att`` are bfloat16 (then the bases are rounded to bf16, the biases and all sums stay float32)."""
    _check_supported(x, groups)
    lay = _layout(x, kernel_size, groups)
    nset = att.shape[1]
    if x.dtype == torch.bfloat16:
        xp, ap = lay.pair_neighbourhoods(x), lay.positions(att)
        out = torch.empty(lay.b, lay.c, lay.length)
        _call("kba_forward", lay, nset, x.dtype, xp, lay.pair_offsets(), ap, *_bf16_bases(weight),
              bias.float().contiguous(), out, *lay.dims(nset), *_split_groups(lay, groups))
        del xp, ap
        return lay.pixels(out, _memory_format(x), torch.bfloat16)
    xp, ap = lay.neighbourhoods(x), lay.positions(att)
    out = x.new_empty(lay.b, lay.c, lay.length)
    _call("kba_forward", lay, nset, x.dtype, xp, lay.offsets, ap, weight.contiguous(), bias.contiguous(), out,
          *lay.dims(nset), *_split_groups(lay, groups))
    del xp, ap  # before the result is allocated: lower peak memory on large images
    return lay.pixels(out, _memory_format(x))


def backward(x: torch.Tensor, att: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, grad_out: torch.Tensor,
             kernel_size: int, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of KBA w.r.t. x, att, weight and bias, recomputing everything from the inputs, each in the dtype
    of its input.

    With bfloat16 ``x`` and ``att`` every gradient runs in the bf16 kernels on the bf16-rounded bases the forward
    applied, with float32 sums: grad_att as the forward, grad_x as a sum of exact products (coefficient × basis,
    then grad_out in float32), grad_w over products grad_out·x rounded to bf16. The weight and bias gradients are
    accumulated and returned in float32."""
    _check_supported(x, groups)
    lay = _layout(x, kernel_size, groups)
    nset = att.shape[1]
    dtypes = (x.dtype, att.dtype, weight.dtype, bias.dtype)
    bf16 = x.dtype == torch.bfloat16
    ap, gp = lay.positions(att), lay.positions(grad_out)
    bias = bias.to(ap.dtype).contiguous()

    parts, qblocks = _split_groups(lay, groups)
    datt = ap.new_zeros(qblocks, lay.b, nset, lay.length)
    if bf16:  # one buffer of x for both kernels: the bf16 pairs the forward read
        xp, offsets = lay.pair_neighbourhoods(x), lay.pair_offsets()
        _call("kba_grad_att", lay, nset, torch.bfloat16, xp, offsets, gp, *_bf16_bases(weight), bias, datt,
              *lay.dims(nset), parts, qblocks)
        weight = weight.to(torch.bfloat16).float()
    else:
        xp, weight = lay.neighbourhoods(x), weight.contiguous()
        _call("kba_grad_att", lay, nset, x.dtype, xp, lay.offsets, gp, weight, bias, datt, *lay.dims(nset), parts,
              qblocks)
    grad_att = lay.pixels(datt.sum(0) if qblocks > 1 else datt[0], _memory_format(att), att.dtype)

    dxp = (ap.new_zeros if lay.accumulates else ap.new_empty)(lay.b, lay.c, lay.chan_stride)
    grad_weight = torch.empty_like(weight)  # the kernel writes every value
    if bf16:
        position_pairs = _position_pairs(ap)
        _call("kba_grad_x_w", lay, nset, torch.bfloat16, xp, offsets, lay.offsets,
              lay.pair_positions(att), position_pairs, position_pairs.shape[-1], gp, weight, dxp,
              grad_weight, *lay.dims(nset), int(lay.accumulates))
    else:
        _call("kba_grad_x_w", lay, nset, xp.dtype, xp, lay.offsets, ap, gp, weight, dxp, grad_weight,
              *lay.dims(nset), int(lay.accumulates))
    grad_bias = (ap @ gp.transpose(1, 2)).sum(0, keepdim=True)
    del xp, ap, gp
    grads = (lay.input_grad(dxp, _memory_format(x), x.dtype), grad_att, grad_weight, grad_bias)
    return tuple(g.to(dtype) for g, dtype in zip(grads, dtypes, strict=True))


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() \
        else torch.contiguous_format


__all__ = ["NativeBuildError", "amx_disabled", "available", "backward", "compute_dtype", "forward",
           "instruction_sets", "native_dtypes", "supports", "unavailable_reason"]
