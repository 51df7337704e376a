"""Triton kernels for INT8 linear layers on CUDA: weight-only (W8A16 / W8A32) and W8A8.

Weights are the runtime's int8 codes ``q`` (N, K) row-major with float32 scales (rows, groups),
rows = 1 or N, optional int8 zero points of the same layout (asymmetric) and optional float32
input-equalization factors ``col_scale`` (K,): ``W = ((q - zero) * scale) / col_scale``
(`nnpq.kernels.int8.dequantize_weight`). Plain-torch references: `nnpq.kernels.reference`.

- `w8_linear`: ``celu(x W^T + b)``, the weight dequantized inside the GEMM, K blocks never
  straddling a quantization group. Codes minus zero points are small integers, exact in
  fp16/bf16/tf32: with one group (per-channel scales) the dot runs on them and the scale goes in
  the epilogue; with groups, each group's scale is folded into the weight tile (default) or
  applied to the group's partial product (``fold_scales=False``, exact weights, slower).
- `w8_linear_input_grad`: ``(grad_y * celu'(z)) @ W``, the input gradient of the same layer,
  with output tiles inside one group so the group's scale folds into grad_y's columns.
- `w8a8_linear`: int8 x int8 -> int32 GEMM. The per-row (per-atom) activation absmax is
  computed IN THE KERNEL: each program first sweeps its rows over K (per K segment when
  ``act_splits`` are given), then quantizes its x tiles in the prologue; the row x channel
  rescale, bias and CELU run in the epilogue. One launch, no int8 copy of x in memory.

Kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``
set before triton is imported), which is how CI checks their arithmetic. Loop bounds (K, group
size, N of the input gradient) are compile-time constants: one compilation per layer shape, and
the interpreter (Triton 3.5 with numpy >= 2.4) cannot loop over runtime scalars.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import triton
import triton.language as tl
import triton.testing
from triton.language.extra import libdevice
from torch import Tensor

from nnpq.errors import NnpqError
from nnpq.kernels.reference import segment_bounds

_FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})
PRECISIONS = ("ieee", "tf32", "tf32x3")
# autotuning is redone per power-of-two bucket of M (atoms of one element), up to this size
M_BUCKET_CAP = 8192


@triton.jit
def _round_half_even(v, FAST: tl.constexpr):
    """Round to the nearest integer, ties to even (torch.round); ``FAST`` uses the GPU's cvt.rni."""
    if FAST:
        return libdevice.rint(v)
    f = tl.floor(v)
    d = v - f  # exact for |v| < 2^23
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # the interpreter cannot multiply bf16 tiles; fp32 products of 16-bit floats are exact, so
    # upcasting there changes only the summation order, not what is computed
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _bias_celu(acc, b_ptr, rn, mask_n, HAS_BIAS: tl.constexpr, CELU_ALPHA: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if CELU_ALPHA > 0.0:
        # the minimum keeps exp finite on the branch tl.where discards
        acc = tl.where(acc > 0.0, acc, CELU_ALPHA * (tl.exp(tl.minimum(acc, 0.0) / CELU_ALPHA) - 1.0))
    return acc


@triton.jit
def _w8_linear_kernel(x_ptr, w_ptr, s_ptr, z_ptr, c_ptr, b_ptr, y_ptr,
                      M, N, stride_xm, stride_sn, stride_zn, stride_zg, stride_c, stride_ym, M_BUCKET,
                      K: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr,
                      HAS_ZERO: tl.constexpr, HAS_COL: tl.constexpr, HAS_BIAS: tl.constexpr,
                      CELU_ALPHA: tl.constexpr, FOLD_SCALES: tl.constexpr, PRECISION: tl.constexpr,
                      UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # N tiles vary fastest, so programs running together share x rows (and the whole weight) in L2
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rm < M
    mask_n = rn < N
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # flat loop over K blocks that never straddle a quantization group (pipelined by Triton)
    BLOCKS_PER_GROUP: tl.constexpr = (GROUP + BLOCK_K - 1) // BLOCK_K
    NUM_GROUPS: tl.constexpr = K // GROUP
    for b in range(NUM_GROUPS * BLOCKS_PER_GROUP):
        g = b // BLOCKS_PER_GROUP
        within = (b % BLOCKS_PER_GROUP) * BLOCK_K + rk
        mask_k = within < GROUP
        k = g * GROUP + within
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if HAS_COL:
            c = tl.load(c_ptr + k * stride_c, mask=mask_k, other=1.0)
            x = (x.to(tl.float32) * (1.0 / c)[None, :]).to(x_ptr.dtype.element_ty)
        # int8 -> fp32 -> dot dtype: integers up to 255 in magnitude are exact in every dot dtype
        w = tl.load(w_ptr + rn[None, :] * K + k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0).to(tl.float32)
        if HAS_ZERO:
            w -= tl.load(z_ptr + rn * stride_zn + g * stride_zg, mask=mask_n, other=0).to(tl.float32)[None, :]
        if NUM_GROUPS == 1:
            acc = _dot(x, w.to(x_ptr.dtype.element_ty), acc, PRECISION, UPCAST)
        else:
            s = tl.load(s_ptr + rn * stride_sn + g, mask=mask_n, other=0.0)
            if FOLD_SCALES:
                # the dequantized weight, rounded to the dot dtype, keeps one accumulator chain
                acc = _dot(x, (w * s[None, :]).to(x_ptr.dtype.element_ty), acc, PRECISION, UPCAST)
            else:
                part = _dot(x, w.to(x_ptr.dtype.element_ty), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
                            PRECISION, UPCAST)
                acc += part * s[None, :]
    if NUM_GROUPS == 1:
        acc *= tl.load(s_ptr + rn * stride_sn, mask=mask_n, other=0.0)[None, :]
    acc = _bias_celu(acc, b_ptr, rn, mask_n, HAS_BIAS, CELU_ALPHA)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _w8_input_grad_kernel(g_ptr, a_ptr, w_ptr, s_ptr, z_ptr, c_ptr, o_ptr,
                          M, stride_gm, stride_am, stride_sn, stride_zn, stride_zg, stride_c, stride_om, M_BUCKET,
                          N: tl.constexpr, K: tl.constexpr, GROUP: tl.constexpr, BLOCK_R: tl.constexpr,
                          HAS_ZERO: tl.constexpr, HAS_COL: tl.constexpr, CELU_ALPHA: tl.constexpr,
                          PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # output tile: BLOCK_M rows x BLOCK_N input features inside ONE quantization group, so the
    # group's scale and zero point are vectors over the reduced dimension N: the scale folds into
    # grad_y's columns and the dot runs on exact codes minus zeros
    BLOCKS_PER_GROUP: tl.constexpr = (GROUP + BLOCK_N - 1) // BLOCK_N
    grp = tl.program_id(0) // BLOCKS_PER_GROUP
    within = (tl.program_id(0) % BLOCKS_PER_GROUP) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = within < GROUP
    rk = grp * GROUP + within
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rm < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_R):
        rn = n0 + tl.arange(0, BLOCK_R)
        mask_n = rn < N
        mask_mn = mask_m[:, None] & mask_n[None, :]
        g = tl.load(g_ptr + rm[:, None] * stride_gm + rn[None, :], mask=mask_mn, other=0.0).to(tl.float32)
        if CELU_ALPHA > 0.0:
            y = tl.load(a_ptr + rm[:, None] * stride_am + rn[None, :], mask=mask_mn, other=0.0).to(tl.float32)
            g *= tl.where(y > 0.0, 1.0, y / CELU_ALPHA + 1.0)
        g *= tl.load(s_ptr + rn * stride_sn + grp, mask=mask_n, other=0.0)[None, :]
        w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0).to(tl.float32)
        if HAS_ZERO:
            w -= tl.load(z_ptr + rn * stride_zn + grp * stride_zg, mask=mask_n, other=0).to(tl.float32)[:, None]
        acc = _dot(g.to(g_ptr.dtype.element_ty), w.to(g_ptr.dtype.element_ty), acc, PRECISION, UPCAST)
    if HAS_COL:
        acc /= tl.load(c_ptr + rk * stride_c, mask=mask_k, other=1.0)[None, :]
    tl.store(o_ptr + rm[:, None] * stride_om + rk[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_k[None, :])


@triton.jit
def _w8a8_kernel(x_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, M, N, stride_xm, stride_ym, M_BUCKET,
                 K: tl.constexpr, SPLITS: tl.constexpr, NUM_SEG: tl.constexpr, BLOCK_K: tl.constexpr,
                 HAS_BIAS: tl.constexpr, CELU_ALPHA: tl.constexpr, FAST_RINT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rm < M
    mask_n = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # static_range unrolls the segments, so their bounds stay compile-time constants (no names: the
    # compiler forbids reassigning a constexpr in an unrolled loop)
    for s in tl.static_range(NUM_SEG):
        # sweep 1: absmax of each row over this segment
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(SPLITS[s], SPLITS[s + 1], BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=mask_m[:, None] & (k < SPLITS[s + 1])[None, :],
                        other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
        amax = tl.maximum(amax, 1e-12)
        inv = tl.math.div_rn(tl.full((BLOCK_M,), 127.0, tl.float32), amax)
        # sweep 2: quantize the tile in registers, int8 x int8 -> int32 on the tensor cores
        iacc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(SPLITS[s], SPLITS[s + 1], BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            mask_k = k < SPLITS[s + 1]
            x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            xq = _round_half_even(x.to(tl.float32) * inv[:, None], FAST_RINT)
            xq = tl.minimum(tl.maximum(xq, -127.0), 127.0).to(tl.int8)
            w = tl.load(w_ptr + rn[None, :] * K + k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0)
            iacc = tl.dot(xq, w, iacc, out_dtype=tl.int32)
        # |int sum| <= 127 * 127 * 1040 < 2^24: exact in float32
        acc += iacc.to(tl.float32) * (amax / 127.0)[:, None]
    acc *= tl.load(ws_ptr + rn, mask=mask_n, other=0.0)[None, :]
    acc = _bias_celu(acc, b_ptr, rn, mask_n, HAS_BIAS, CELU_ALPHA)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


# triton.jit picks the interpreter at decoration time (TRITON_INTERPRET=1): ask what it produced
INTERPRETED = not isinstance(_w8_linear_kernel, triton.runtime.JITFunction)

# (BLOCK_M, BLOCK_N, num_warps): BLOCK_M 16 serves M <= 16 (rare elements), the smallest tile tl.dot takes
_TILES = [(16, 64, 4), (16, 128, 4), (32, 64, 4), (32, 128, 4), (64, 64, 4), (64, 128, 4), (128, 64, 4), (128, 128, 8)]
_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=3) for bm, bn, w in _TILES]
# the input gradient's tile width follows the quantization group (`_group_tile`); only BLOCK_M is tuned
_GRAD_CONFIGS = [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=3)
                 for bm, w in [(16, 4), (32, 4), (64, 4), (128, 4), (128, 8)]]
# the one tile the interpreter runs (autotuning there would only cost time); `interpreter_tile` widens it
_INTERPRETER_TILE = {"BLOCK_M": 16, "BLOCK_N": 64}
_INTERPRETER_MAX_BLOCK_K: list[int] = []  # set inside `interpreter_tile`


@contextmanager
def interpreter_tile(block_n: int, max_block_k: int) -> Iterator[None]:
    """Run the interpreter with wider tiles (BLOCK_N, and K blocks up to ``max_block_k``) inside the block.

    The interpreter's cost is per tile operation, not per element: whole ANI layers (N = 2048,
    K = 1008) run ~10x faster on 256 x 128 tiles. The kernel tests keep the narrow default,
    which puts more tile edges inside their small shapes. No effect on compiled kernels.
    """
    saved = dict(_INTERPRETER_TILE)
    _INTERPRETER_TILE["BLOCK_N"] = block_n
    _INTERPRETER_MAX_BLOCK_K.append(max_block_k)
    try:
        yield
    finally:
        _INTERPRETER_TILE.update(saved)
        _INTERPRETER_MAX_BLOCK_K.pop()


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Tiles for the M bucket: BLOCK_M = the bucket up to 64, and 64 or 128 above (at most 4 configs)."""
    bucket = {**named_args, **kwargs}["M_BUCKET"]  # passed by keyword: Triton puts it in kwargs
    wanted = {bucket} if bucket <= 64 else {64, 128}
    return [c for c in configs if c.kwargs["BLOCK_M"] in wanted]


def _quick_bench(fn, quantiles):
    # the kernels take microseconds: short benchmarks keep first calls (compile + tune) to about a second
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


def _tuned(kernel, configs: list[triton.Config]):
    return triton.autotune(configs=configs, key=["M_BUCKET", "N", "K"], prune_configs_by={"early_config_prune": _prune},
                           do_bench=_quick_bench)(kernel)


_w8_linear_tuned = _tuned(_w8_linear_kernel, _CONFIGS)
_w8_input_grad_tuned = _tuned(_w8_input_grad_kernel, _GRAD_CONFIGS)
_w8a8_tuned = _tuned(_w8a8_kernel, _CONFIGS)


def m_bucket(rows: int) -> int:
    """The autotuning bucket of ``rows``: the next power of two, 16 to `M_BUCKET_CAP`."""
    return min(max(16, triton.next_power_of_2(rows)), M_BUCKET_CAP)


def _launch(kernel, tuned, col_tiles, rows: int, *args, **meta) -> None:
    """Launch on a (col_tiles(meta), row tiles) grid: the interpreter's fixed tile, or the autotuned one on a GPU."""
    meta["M_BUCKET"] = m_bucket(rows)
    if INTERPRETED:
        meta = {**_INTERPRETER_TILE, **meta}
        kernel[(col_tiles(meta), triton.cdiv(rows, meta["BLOCK_M"]))](*args, **meta)
    else:
        tuned[lambda m: (col_tiles(m), triton.cdiv(rows, m["BLOCK_M"]))](*args, **meta)


def _column_tiles(cols: int):
    return lambda meta: triton.cdiv(cols, meta["BLOCK_N"])


def _group_tile(group_size: int) -> int:
    """Input-gradient tile width: one group of up to 64 features (16 at least, tl.dot's minimum), else 128."""
    return max(16, triton.next_power_of_2(group_size)) if group_size <= 64 else 128


def _block_k(extent: int, dtype: torch.dtype) -> int:
    """K block: the next power of two of ``extent`` (one quantization group), 16 to 64 (32 for fp32 tiles)."""
    cap = 32 if dtype == torch.float32 else 64
    if INTERPRETED and _INTERPRETER_MAX_BLOCK_K:
        cap = _INTERPRETER_MAX_BLOCK_K[-1]
    return max(16, min(triton.next_power_of_2(extent), cap))


# ----------------------------------------------------------------------------- validation


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise NnpqError(message)


def _check_device(*tensors: Tensor | None) -> None:
    devices = {t.device for t in tensors if t is not None}
    _check(len(devices) == 1, f"all kernel inputs must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if INTERPRETED:
        _check(device.type == "cpu", f"under TRITON_INTERPRET=1 the Triton kernels take CPU tensors, got {device}")
    else:
        _check(device.type == "cuda",
               f"the Triton kernels need CUDA tensors, got {device}; set TRITON_INTERPRET=1 before importing "
               "triton to run them on the CPU")


def _check_float_input(name: str, t: Tensor, k: int) -> Tensor:
    _check(t.dtype in _FLOAT_DTYPES, f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    _check(t.dim() == 2 and t.shape[1] == k, f"{name} must have shape (M, {k}), got {tuple(t.shape)}")
    return t if t.stride(1) == 1 else t.contiguous()


def _check_weight(qweight: Tensor) -> tuple[int, int]:
    _check(qweight.dtype == torch.int8 and qweight.dim() == 2,
           f"qweight must be a 2-D int8 tensor (out_features, in_features), got {qweight.dtype} {tuple(qweight.shape)}")
    _check(qweight.is_contiguous(), "qweight must be contiguous (row-major out_features x in_features)")
    return qweight.shape[0], qweight.shape[1]


def _quant_layout(qweight: Tensor, scale: Tensor, zero: Tensor | None, group_size: int,
                  col_scale: Tensor | None) -> tuple[Tensor, Tensor, Tensor, tuple[int, int, int, int]]:
    """Validated (scale, zero, col_scale, (stride_sn, stride_zn, stride_zg, stride_c)) for the kernels."""
    n, k = _check_weight(qweight)
    _check(isinstance(group_size, int) and group_size > 0 and k % group_size == 0,
           f"group_size {group_size} must divide in_features {k}")
    groups = k // group_size
    _check(scale.dtype == torch.float32 and scale.dim() == 2 and scale.shape[0] in (1, n) and scale.shape[1] == groups,
           f"scale must be float32 of shape (1 or {n}, {groups}), got {scale.dtype} {tuple(scale.shape)}")
    scale = scale.contiguous()
    strides = [scale.stride(0) if scale.shape[0] > 1 else 0]
    if zero is None:
        zero = scale  # placeholder pointer, never read (HAS_ZERO is False)
        strides += [0, 0]
    else:
        _check(zero.dtype == torch.int8 and zero.dim() == 2 and zero.shape[0] in (1, scale.shape[0])
               and zero.shape[1] in (1, groups),
               f"zero must be int8 of shape (1 or {scale.shape[0]}, 1 or {groups}), got {zero.dtype} {tuple(zero.shape)}")
        zero = zero.contiguous()
        strides += [zero.stride(0) if zero.shape[0] > 1 else 0, zero.stride(1) if zero.shape[1] > 1 else 0]
    if col_scale is None:
        col_scale = scale
        strides.append(0)
    else:
        _check(col_scale.dtype == torch.float32 and col_scale.dim() == 1 and col_scale.numel() in (1, k),
               f"col_scale must be float32 of shape ({k},) or (1,), got {col_scale.dtype} {tuple(col_scale.shape)}")
        strides.append(1 if col_scale.numel() > 1 else 0)
    return scale, zero, col_scale, tuple(strides)


def _check_epilogue(bias: Tensor | None, n: int, celu_alpha: float | None) -> float:
    if bias is not None:
        _check(bias.dim() == 1 and bias.numel() == n and bias.dtype in _FLOAT_DTYPES,
               f"bias must be a float vector of length {n}, got {bias.dtype} {tuple(bias.shape)}")
    _check(celu_alpha is None or celu_alpha > 0, f"celu_alpha must be positive or None, got {celu_alpha}")
    return 0.0 if celu_alpha is None else float(celu_alpha)


def _check_precision(precision: str) -> None:
    _check(precision in PRECISIONS, f"precision must be one of {PRECISIONS} (float32 inputs only), got {precision!r}")


def _dot_precision(precision: str, dtype: torch.dtype) -> str:
    """The precision only selects how float32 tiles use the tensor cores; 16-bit tiles get Triton's default."""
    return precision if dtype == torch.float32 else "tf32"


def _out_dtype(out_dtype: torch.dtype | None, default: torch.dtype) -> torch.dtype:
    out = default if out_dtype is None else out_dtype
    _check(out in _FLOAT_DTYPES, f"out_dtype must be float16, bfloat16 or float32, got {out}")
    return out


# ----------------------------------------------------------------------------- public wrappers


def w8_linear(x: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor | None, group_size: int,
              bias: Tensor | None = None, col_scale: Tensor | None = None, celu_alpha: float | None = None,
              out_dtype: torch.dtype | None = None, precision: str = "tf32", fold_scales: bool = True) -> Tensor:
    """``celu(x W^T + b)`` with ``W = ((q - zero) * scale) / col_scale`` dequantized inside the GEMM.

    x: (M, K) float16 / bfloat16 (W8A16, fp32 accumulation) or float32 (W8A32; ``precision``
    "tf32", "tf32x3" or "ieee" picks the tensor-core mode). qweight: int8 (N, K). scale:
    float32 (1 or N, K // group_size). zero: int8 of the scale's layout, (1, 1), or None
    (symmetric). col_scale: float32 (K,) or None; it is folded into x, which is then rounded to
    x's dtype. bias: (N,) or None. celu_alpha: CELU's alpha (ANI: 0.1) or None for no activation.
    fold_scales (group-wise layouts only): True multiplies each group's scale into the weight tile,
    rounded to x's dtype, and keeps one accumulator chain; False keeps the codes minus zeros exact
    in the dot and scales each group's partial product after it (slower; rounds only x). One
    group (per-channel or per-tensor scales) is always exact: the scale goes in the epilogue.
    Returns (M, N) in ``out_dtype`` (default x's dtype). Units are the caller's.
    """
    n, k = _check_weight(qweight)
    x = _check_float_input("x", x, k)
    scale, zero_t, col_t, (s_sn, s_zn, s_zg, s_c) = _quant_layout(qweight, scale, zero, group_size, col_scale)
    alpha = _check_epilogue(bias, n, celu_alpha)
    _check_precision(precision)
    _check(isinstance(fold_scales, bool), f"fold_scales must be True or False, got {fold_scales!r}")
    _check_device(x, qweight, scale, zero, col_scale, bias)
    y = torch.empty(x.shape[0], n, dtype=_out_dtype(out_dtype, x.dtype), device=x.device)
    if x.shape[0] == 0:
        return y
    _launch(_w8_linear_kernel, _w8_linear_tuned, _column_tiles(n), x.shape[0],
            x, qweight, scale, zero_t, col_t, scale if bias is None else bias, y,
            x.shape[0], n, x.stride(0), s_sn, s_zn, s_zg, s_c, y.stride(0),
            K=k, GROUP=group_size, BLOCK_K=_block_k(group_size, x.dtype),
            HAS_ZERO=zero is not None, HAS_COL=col_scale is not None, HAS_BIAS=bias is not None,
            CELU_ALPHA=alpha, FOLD_SCALES=fold_scales, PRECISION=_dot_precision(precision, x.dtype),
            UPCAST=INTERPRETED)
    return y


def w8_linear_input_grad(grad_y: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor | None, group_size: int,
                         col_scale: Tensor | None = None, celu_output: Tensor | None = None,
                         celu_alpha: float | None = None, out_dtype: torch.dtype | None = None,
                         precision: str = "tf32") -> Tensor:
    """``dE/dx = (grad_y * celu'(z)) @ W`` for the layer ``y = celu(x W^T + b)`` of `w8_linear`.

    grad_y: (M, N) dE/dy. With ``celu_output`` (the layer's output y, (M, N)) and ``celu_alpha``
    the CELU derivative is applied in the prologue (celu' = 1 where y > 0, else y/alpha + 1);
    without them the result is ``grad_y @ W``. Each output tile lies in one quantization group:
    ``grad_y * celu' * scale`` is rounded to grad_y's dtype and meets the exact codes minus zeros
    in the dot. Returns (M, K) in ``out_dtype`` (default grad_y's dtype).
    """
    n, k = _check_weight(qweight)
    grad_y = _check_float_input("grad_y", grad_y, n)
    scale, zero_t, col_t, (s_sn, s_zn, s_zg, s_c) = _quant_layout(qweight, scale, zero, group_size, col_scale)
    _check((celu_output is None) == (celu_alpha is None), "give celu_output and celu_alpha together, or neither")
    alpha = _check_epilogue(None, n, celu_alpha)
    if celu_output is not None:
        _check(celu_output.shape == grad_y.shape, f"celu_output must have grad_y's shape {tuple(grad_y.shape)}, "
               f"got {tuple(celu_output.shape)}")
        celu_output = _check_float_input("celu_output", celu_output, n)
    _check_precision(precision)
    _check_device(grad_y, qweight, scale, zero, col_scale, celu_output)
    out = torch.empty(grad_y.shape[0], k, dtype=_out_dtype(out_dtype, grad_y.dtype), device=grad_y.device)
    if grad_y.shape[0] == 0:
        return out
    act = grad_y if celu_output is None else celu_output
    tile_n = _group_tile(group_size)
    tiles = (k // group_size) * triton.cdiv(group_size, tile_n)
    _launch(_w8_input_grad_kernel, _w8_input_grad_tuned, lambda meta: tiles, grad_y.shape[0],
            grad_y, act, qweight, scale, zero_t, col_t, out,
            grad_y.shape[0], grad_y.stride(0), act.stride(0), s_sn, s_zn, s_zg, s_c, out.stride(0),
            N=n, K=k, GROUP=group_size, BLOCK_R=_block_k(n, grad_y.dtype), BLOCK_N=tile_n,
            HAS_ZERO=zero is not None, HAS_COL=col_scale is not None, CELU_ALPHA=alpha,
            PRECISION=_dot_precision(precision, grad_y.dtype), UPCAST=INTERPRETED)
    return out


def w8a8_linear(x: Tensor, qweight: Tensor, wscale: Tensor, bias: Tensor | None = None,
                celu_alpha: float | None = None, act_splits: Sequence[int] = (),
                out_dtype: torch.dtype | None = None) -> Tensor:
    """``celu((round(x / sx) @ q^T) * sx * wscale + b)``: W8A8 with dynamic per-row activation scales.

    x: (M, K) float. qweight: int8 (N, K), symmetric codes. wscale: float32 per output channel,
    (N,) or (N, 1). act_splits: interior K boundaries of segments that get their own row
    scale (ANI-2x AEV: ``(112,)`` separates the radial and angular blocks). Activation
    rounding as `nnpq.kernels.reference.quantize_rows`. Returns (M, N) in ``out_dtype``
    (default x's dtype).
    """
    n, k = _check_weight(qweight)
    x = _check_float_input("x", x, k)
    _check(wscale.dtype == torch.float32 and wscale.numel() == n and wscale.dim() <= 2,
           f"wscale must be float32 with one scale per output channel ({n}), got {wscale.dtype} {tuple(wscale.shape)}")
    splits = segment_bounds(k, act_splits)
    _check(all(a < b for a, b in zip(splits[:-1], splits[1:])),
           f"act_splits must increase strictly inside (0, {k}), got {tuple(act_splits)}")
    alpha = _check_epilogue(bias, n, celu_alpha)
    _check_device(x, qweight, wscale, bias)
    y = torch.empty(x.shape[0], n, dtype=_out_dtype(out_dtype, x.dtype), device=x.device)
    if x.shape[0] == 0:
        return y
    wscale = wscale.reshape(n).contiguous()
    _launch(_w8a8_kernel, _w8a8_tuned, _column_tiles(n), x.shape[0],
            x, qweight, wscale, wscale if bias is None else bias, y,
            x.shape[0], n, x.stride(0), y.stride(0),
            K=k, SPLITS=splits, NUM_SEG=len(splits) - 1, BLOCK_K=64, HAS_BIAS=bias is not None, CELU_ALPHA=alpha,
            FAST_RINT=not INTERPRETED)
    return y
