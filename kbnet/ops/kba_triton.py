"""Fused Triton kernels of KBA: forward and the gradients of x, att, weight and bias, without any per-pixel fused
kernel in global memory.

Every program takes a tile of ``BLOCK`` pixels and one channel group. It mixes the bases of the group in registers
with one ``tl.dot``: the coefficient tile (BLOCK × nset) times the group's bases (nset × columns), where a column is
one (out-channel, in-channel, tap) of the group's kernels, taps padded to a power of two. The fused kernels are then
multiplied with the gathered neighbourhoods and reduced per out-channel, still in registers.

- forward: one program per (tile, group, image);
- grad x: gathers instead of scattering (no atomics): for every tap it recomputes the fused kernels of the pixels
  whose neighbourhood contains the output pixel, one (tile, group, image) program each;
- grad att: each (tile, image, part) program walks a strided set of the groups, accumulating (g·x) @ basesᵀ, and
  writes a float32 partial sum; enough parts that small deep levels still fill the GPU;
- grad weight and bias: ``split`` programs per group walk strided sets of pixel tiles and write per-program partial
  sums (float32). ``torch.sum`` reduces the partial sums of both: deterministic, no float atomics.

Inputs may be float32 (``tl.dot`` uses TF32 when torch's float32 matmul precision allows it), bfloat16 or float16;
accumulation is always float32. The kernels are jitted on first use; with ``TRITON_INTERPRET=1`` set before
triton is imported, Triton's interpreter runs them on CPU tensors (that is how the tests check them without a GPU, in
a subprocess of their own, since the variable changes all of triton for the process). In a ``dry_run()`` the
wrappers only count the launches they would issue (launch tables without a GPU, ``kbnet.ops.launches``).
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

tl = None
"""``triton.language``, bound when the kernels are first compiled: importing triton takes seconds, which every
``import kbnet`` would otherwise pay."""

BLOCK = 64
"""Pixels per program."""
MAX_COLUMNS = 512
"""Most columns (channels per group² × padded taps) one program holds in registers: k=3 with up to 4 channels per
group (the group sizes of KBNet_s and KBNet_l), or k=5 with up to 4."""
MAX_NSET = 128
SPLIT_PROGRAMS = 1024
"""Programs the reductions of the att and the weight gradients aim at: enough to fill a GPU, few partial sums."""
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_dry_run: ContextVar[bool] = ContextVar("kbnet_triton_dry_run", default=False)
launches: Counter[str] = Counter()
"""Triton kernel launches issued so far, by kernel (``forward``, ``grad_x``, ``grad_att``, ``grad_weight``)."""


@contextmanager
def dry_run() -> Iterator[None]:
    """Inside the block the wrappers accept tensors of any device and count the launches they would issue, without
    launching anything: with fake tensors, the launch table of a step on a machine without a GPU."""
    token = _dry_run.set(True)
    try:
        yield
    finally:
        _dry_run.reset(token)


def interpreting() -> bool:
    """Whether triton runs its interpreter (``TRITON_INTERPRET=1`` when triton was imported): kernels then run on
    CPU tensors. Triton decides this once, at import, for its own library functions too."""
    return import_error() is None and _interpreted()


@functools.cache
def import_error() -> str | None:
    """Why triton cannot be imported, or ``None``."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return f"triton is not installed ({err}); install it with the gpu extra: pip install 'kbnet[gpu]'"
    _interpreted()
    return None


@functools.cache
def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _pow2(n: int, least: int = 16) -> int:
    return max(least, 1 << (n - 1).bit_length())


def _columns(group_channels: int, kernel_size: int) -> int:
    return _pow2(group_channels**2 * _pow2(kernel_size**2))


def unsupported_reason(device: str, dtype: torch.dtype, channels: int, nset: int, groups: int,
                       kernel_size: int) -> str | None:
    """Why the Triton kernels cannot run a call on ``device`` (a device type) with operands of ``dtype``, or
    ``None`` when they can."""
    error = import_error()
    if error is not None:
        return error
    if device != "cuda" and not (device == "cpu" and interpreting()) and not _dry_run.get():
        return (f"the Triton kernels need CUDA tensors (CPU tensors only in Triton's interpreter: TRITON_INTERPRET=1 "
                f"before triton is imported); got a {device} tensor")
    if dtype not in DTYPES:
        return f"the Triton kernels take float32, bfloat16 or float16; got {dtype}"
    gc = channels // groups
    if _columns(gc, kernel_size) > MAX_COLUMNS:
        return (f"{gc} channels per group with kernel size {kernel_size} need {_columns(gc, kernel_size)} register "
                f"columns per program, more than the {MAX_COLUMNS} the kernels are built for")
    if nset > MAX_NSET:
        return f"{nset} kernel bases are more than the {MAX_NSET} the kernels hold in registers"
    return None


def _forward_kernel(x_ptr, att_ptr, w_ptr, b_ptr, out_ptr, C, H, W, N,
                    GC: tl.constexpr, KS: tl.constexpr, NP: tl.constexpr, TP: tl.constexpr, JP: tl.constexpr,
                    BLOCK: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr):
    tile = tl.program_id(0)
    g = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    hw = H * W
    p = tile * BLOCK + tl.arange(0, BLOCK)
    pm = p < hw
    row, col = p // W, p % W
    n = tl.arange(0, NP)
    nm = n < N
    j = tl.arange(0, JP)
    pair, tap = j // TP, j % TP
    o, i = pair // GC, pair % GC
    jm = (pair < GC * GC) & (tap < KS * KS)
    a = tl.load(att_ptr + (b * N + n[None, :]) * hw + p[:, None], mask=pm[:, None] & nm[None, :], other=0.0)
    wcol = (g * GC * GC + pair) * (KS * KS) + tap
    wv = tl.load(w_ptr + n[:, None] * (C * GC * KS * KS) + wcol[None, :], mask=nm[:, None] & jm[None, :], other=0.0)
    kern = tl.dot(a.to(DOT), wv.to(DOT), input_precision=PRECISION)
    r = row[:, None] + tap[None, :] // KS - KS // 2
    c = col[:, None] + tap[None, :] % KS - KS // 2
    xm = pm[:, None] & jm[None, :] & (r >= 0) & (r < H) & (c >= 0) & (c < W)
    xv = tl.load(x_ptr + (b * C + g * GC + i[None, :]) * hw + r * W + c, mask=xm, other=0.0)
    prod = kern * xv.to(tl.float32)
    af = a.to(tl.float32)
    for ol in tl.static_range(GC):
        out_c = g * GC + ol
        acc = tl.sum(tl.where((o == ol)[None, :], prod, 0.0), axis=1)
        bv = tl.load(b_ptr + n * C + out_c, mask=nm, other=0.0).to(tl.float32)
        acc += tl.sum(af * bv[None, :], axis=1)
        tl.store(out_ptr + (b * C + out_c) * hw + p, acc.to(out_ptr.dtype.element_ty), mask=pm)


def _grad_x_kernel(att_ptr, w_ptr, g_ptr, gx_ptr, C, H, W, N,
                   GC: tl.constexpr, KS: tl.constexpr, NP: tl.constexpr, PP: tl.constexpr,
                   BLOCK: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr):
    tile = tl.program_id(0)
    g = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    hw = H * W
    q = tile * BLOCK + tl.arange(0, BLOCK)
    qm = q < hw
    row, col = q // W, q % W
    n = tl.arange(0, NP)
    nm = n < N
    j = tl.arange(0, PP)
    o, i = j // GC, j % GC
    jm = j < GC * GC
    acc = tl.zeros([BLOCK, PP], dtype=tl.float32)
    for t in tl.static_range(KS * KS):
        r = row - (t // KS - KS // 2)
        c = col - (t % KS - KS // 2)
        valid = qm & (r >= 0) & (r < H) & (c >= 0) & (c < W)
        src = r * W + c
        a = tl.load(att_ptr + (b * N + n[None, :]) * hw + src[:, None], mask=valid[:, None] & nm[None, :], other=0.0)
        wv = tl.load(w_ptr + n[:, None] * (C * GC * KS * KS) + (g * GC * GC + j[None, :]) * (KS * KS) + t,
                     mask=nm[:, None] & jm[None, :], other=0.0)
        kern = tl.dot(a.to(DOT), wv.to(DOT), input_precision=PRECISION)
        gv = tl.load(g_ptr + (b * C + g * GC + o[None, :]) * hw + src[:, None], mask=valid[:, None] & jm[None, :],
                     other=0.0)
        acc += kern * gv.to(tl.float32)
    for il in tl.static_range(GC):
        s = tl.sum(tl.where((i == il)[None, :], acc, 0.0), axis=1)
        tl.store(gx_ptr + (b * C + g * GC + il) * hw + q, s.to(gx_ptr.dtype.element_ty), mask=qm)


def _grad_att_kernel(x_ptr, w_ptr, b_ptr, g_ptr, ga_ptr, B, C, H, W, N, GROUPS, GSPLIT,
                     GC: tl.constexpr, KS: tl.constexpr, NP: tl.constexpr, TP: tl.constexpr, JP: tl.constexpr,
                     OP: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr):
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    part = tl.program_id(2)
    hw = H * W
    p = tile * BLOCK + tl.arange(0, BLOCK)
    pm = p < hw
    row, col = p // W, p % W
    n = tl.arange(0, NP)
    nm = n < N
    j = tl.arange(0, JP)
    pair, tap = j // TP, j % TP
    o, i = pair // GC, pair % GC
    jm = (pair < GC * GC) & (tap < KS * KS)
    r = row[:, None] + tap[None, :] // KS - KS // 2
    c = col[:, None] + tap[None, :] % KS - KS // 2
    xm = pm[:, None] & jm[None, :] & (r >= 0) & (r < H) & (c >= 0) & (c < W)
    ob = tl.arange(0, OP)
    obm = ob < GC
    acc = tl.zeros([BLOCK, NP], dtype=tl.float32)
    for g in range(part, GROUPS, GSPLIT):
        xv = tl.load(x_ptr + (b * C + g * GC + i[None, :]) * hw + r * W + c, mask=xm, other=0.0)
        gv = tl.load(g_ptr + (b * C + g * GC + o[None, :]) * hw + p[:, None], mask=pm[:, None] & jm[None, :],
                     other=0.0)
        gk = (xv.to(tl.float32) * gv.to(tl.float32)).to(DOT)
        wcol = (g * GC * GC + pair) * (KS * KS) + tap
        wt = tl.load(w_ptr + n[None, :] * (C * GC * KS * KS) + wcol[:, None], mask=jm[:, None] & nm[None, :],
                     other=0.0)
        acc += tl.dot(gk, wt.to(DOT), input_precision=PRECISION)
        go = tl.load(g_ptr + (b * C + g * GC + ob[None, :]) * hw + p[:, None], mask=pm[:, None] & obm[None, :],
                     other=0.0)
        bt = tl.load(b_ptr + n[None, :] * C + g * GC + ob[:, None], mask=obm[:, None] & nm[None, :], other=0.0)
        acc += tl.dot(go.to(DOT), bt.to(DOT), input_precision=PRECISION)
    tl.store(ga_ptr + ((part * B + b) * N + n[None, :]) * hw + p[:, None], acc, mask=pm[:, None] & nm[None, :])


def _grad_weight_kernel(x_ptr, att_ptr, g_ptr, pw_ptr, pb_ptr, B, C, H, W, N, SPLIT,
                        GC: tl.constexpr, KS: tl.constexpr, NP: tl.constexpr, TP: tl.constexpr, JP: tl.constexpr,
                        OP: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr):
    g = tl.program_id(0)
    s = tl.program_id(1)
    hw = H * W
    tiles = tl.cdiv(hw, BLOCK)
    n = tl.arange(0, NP)
    nm = n < N
    j = tl.arange(0, JP)
    pair, tap = j // TP, j % TP
    o, i = pair // GC, pair % GC
    jm = (pair < GC * GC) & (tap < KS * KS)
    ob = tl.arange(0, OP)
    obm = ob < GC
    acc_w = tl.zeros([NP, JP], dtype=tl.float32)
    acc_b = tl.zeros([NP, OP], dtype=tl.float32)
    for t in range(s, B * tiles, SPLIT):
        b = (t // tiles).to(tl.int64)
        p = (t % tiles) * BLOCK + tl.arange(0, BLOCK)
        pm = p < hw
        row, col = p // W, p % W
        r = row[:, None] + tap[None, :] // KS - KS // 2
        c = col[:, None] + tap[None, :] % KS - KS // 2
        xm = pm[:, None] & jm[None, :] & (r >= 0) & (r < H) & (c >= 0) & (c < W)
        a = tl.load(att_ptr + (b * N + n[None, :]) * hw + p[:, None], mask=pm[:, None] & nm[None, :], other=0.0)
        xv = tl.load(x_ptr + (b * C + g * GC + i[None, :]) * hw + r * W + c, mask=xm, other=0.0)
        gv = tl.load(g_ptr + (b * C + g * GC + o[None, :]) * hw + p[:, None], mask=pm[:, None] & jm[None, :],
                     other=0.0)
        gk = (xv.to(tl.float32) * gv.to(tl.float32)).to(DOT)
        at = tl.trans(a.to(DOT))
        acc_w += tl.dot(at, gk, input_precision=PRECISION)
        go = tl.load(g_ptr + (b * C + g * GC + ob[None, :]) * hw + p[:, None], mask=pm[:, None] & obm[None, :],
                     other=0.0)
        acc_b += tl.dot(at, go.to(DOT), input_precision=PRECISION)
    wcol = (g * GC * GC + pair) * (KS * KS) + tap
    tl.store(pw_ptr + (s * N + n[:, None]) * (C * GC * KS * KS) + wcol[None, :], acc_w, mask=nm[:, None] & jm[None, :])
    tl.store(pb_ptr + (s * N + n[:, None]) * C + g * GC + ob[None, :], acc_b, mask=nm[:, None] & obm[None, :])


_KERNELS = {"forward": _forward_kernel, "grad_x": _grad_x_kernel, "grad_att": _grad_att_kernel,
            "grad_weight": _grad_weight_kernel}


@functools.cache
def _compiled() -> dict:
    """The kernels, jitted on first use (for the interpreter when triton was imported with ``TRITON_INTERPRET=1``)."""
    global tl
    import triton
    import triton.language as tl

    return {name: triton.jit(fn) for name, fn in _KERNELS.items()}


def _launch(name: str, grid: tuple[int, ...], *args, **meta) -> None:
    launches[name] += 1
    if _dry_run.get():
        return
    warps = 8 if meta.get("JP", 0) >= 256 else 4  # a 64×256 float32 tile is 128 registers a thread at 4 warps
    _compiled()[name][grid](*args, **{**meta, "DOT": getattr(tl, meta["DOT"])}, num_warps=warps)


def _precision(dtype: torch.dtype) -> str:
    """TF32 for float32 inputs exactly when torch's own float32 matmuls may use it."""
    return "tf32" if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest" else "ieee"


def _dot_type(x: torch.Tensor) -> str:
    """The operand type of ``tl.dot``: the input's, except float32 for bfloat16 in Triton 3.9's interpreter, whose
    bfloat16 ``tl.dot`` returns garbage. Exact all the same: a product of two bfloat16 values is a float32 value, and
    the GPU accumulates those products in float32 too."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":
        return "float32"
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[x.dtype]


def _meta(x: torch.Tensor, nset: int, groups: int, kernel_size: int) -> dict:
    gc = x.shape[1] // groups
    taps = _pow2(kernel_size**2)
    return dict(GC=gc, KS=kernel_size, NP=_pow2(nset), BLOCK=BLOCK, PRECISION=_precision(x.dtype),
                TP=taps, JP=_columns(gc, kernel_size), OP=_pow2(gc), DOT=_dot_type(x))


def forward(x: torch.Tensor, att: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, kernel_size: int,
            groups: int) -> torch.Tensor:
    """KBA output (B, C, H, W), contiguous, in the dtype of the operands (which must share one)."""
    x, att, weight, bias = x.contiguous(), att.contiguous(), weight.contiguous(), bias.contiguous()
    b, c, h, w = x.shape
    nset = att.shape[1]
    out = torch.empty_like(x)
    meta = _meta(x, nset, groups, kernel_size)
    del meta["OP"]
    _launch("forward", (-(-h * w // BLOCK), groups, b), x, att, weight, bias, out, c, h, w, nset, **meta)
    return out


def backward(x: torch.Tensor, att: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, grad_out: torch.Tensor,
             kernel_size: int, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of KBA w.r.t. x, att, weight and bias, recomputing the fused kernels from the inputs."""
    x, att, grad_out = x.contiguous(), att.contiguous(), grad_out.contiguous().to(x.dtype)
    weight, bias = weight.contiguous(), bias.contiguous()
    b, c, h, w = x.shape
    nset = att.shape[1]
    meta = _meta(x, nset, groups, kernel_size)
    tiles = -(-h * w // BLOCK)
    grad_x = torch.empty_like(x)
    _launch("grad_x", (tiles, groups, b), att, weight, grad_out, grad_x, c, h, w, nset,
            GC=meta["GC"], KS=kernel_size, NP=meta["NP"], PP=_pow2(meta["GC"] ** 2), BLOCK=BLOCK,
            PRECISION=meta["PRECISION"], DOT=meta["DOT"])
    gsplit = max(1, min(groups, -(-SPLIT_PROGRAMS // (b * tiles))))
    partial_att = x.new_empty(gsplit, *att.shape, dtype=torch.float32)
    _launch("grad_att", (tiles, b, gsplit), x, weight, bias, grad_out, partial_att, b, c, h, w, nset, groups, gsplit,
            **meta)
    grad_att = partial_att.sum(0).to(att.dtype)
    split = max(1, min(b * tiles, SPLIT_PROGRAMS // groups))
    partial_w = x.new_empty(split, nset, weight.shape[-1], dtype=torch.float32)
    partial_b = x.new_empty(split, nset, c, dtype=torch.float32)
    _launch("grad_weight", (groups, split), x, att, grad_out, partial_w, partial_b, b, c, h, w, nset, split,
            **meta)
    grad_weight = partial_w.sum(0, keepdim=True).to(weight.dtype)
    grad_bias = partial_b.sum(0, keepdim=True).to(bias.dtype)
    return grad_x, grad_att, grad_weight, grad_bias
