"""RMSNorm in Triton: one program per row forward; backward rows split over a few programs,
each accumulating its share of dW in fp32 so the reduction over rows needs no atomics.

Loads are upcast to fp32 and results rounded once on store (the interpreter's bf16 math is
broken, and this is also what keeps low-precision results accurate on GPUs).

Forward and backward are the torch ops ``twinkle_triton::rms_norm_forward`` / ``_backward``
with fake kernels and autograd registered here, as the CPU path (``cpu.py``) does: torch.compile
keeps each one node, no graph break and no tracing into the launches.
"""
import math
from typing import Tuple

import torch
import triton
import triton.language as tl

from .autograd import differentiate

MAX_BLOCK = 65536


@triton.jit
def _rms_norm_forward_kernel(X, W, Y, RSTD, stride_x, stride_y, n_cols, eps, offset,
                             BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    y = x * rstd * (w + offset)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_backward_kernel(DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx,
                              n_rows, n_cols, offset, rows_per_program, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # int64 loop index: no overflow of row * stride
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        x_hat = x * rstd
        g = dy * w
        dx = rstd * (g - x_hat * (tl.sum(g * x_hat, axis=0) / n_cols))
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * x_hat
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=mask)


def _launch_settings(n_cols: int):
    block = triton.next_power_of_2(n_cols)
    if block > MAX_BLOCK:
        raise ValueError(f'triton rms_norm supports a hidden size up to {MAX_BLOCK}, got {n_cols}; '
                         f'use backend="reference"')
    num_warps = 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4
    return block, num_warps


def _backward_programs(n_rows: int, device: torch.device) -> int:
    """Enough programs to fill the GPU once; few under the interpreter (each costs ~1 ms)."""
    if device.type == 'cuda':
        return min(n_rows, torch.cuda.get_device_properties(device).multi_processor_count * 2)
    return min(n_rows, 4)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as contiguous (rows, hidden), also when hidden is 0 (where ``reshape(-1, 0)`` fails)."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).contiguous()


@torch.library.custom_op('twinkle_triton::rms_norm_forward', mutates_args=())
def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float,
                     offset: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(y, rstd)``: y like x (contiguous), rstd the fp32 per-row ``1 / rms`` (x's shape without
    its last dim) that backward reuses instead of reducing each row again."""
    x2d = _rows(x)
    n_rows, n_cols = x2d.shape
    y = torch.empty_like(x2d)
    rstd = torch.zeros(n_rows, dtype=torch.float32, device=x.device)  # stays 0 for rows of no columns
    if x2d.numel():
        block, num_warps = _launch_settings(n_cols)
        _rms_norm_forward_kernel[(n_rows,)](x2d, weight.contiguous(), y, rstd, x2d.stride(0), y.stride(0),
                                            n_cols, eps, offset, BLOCK=block, num_warps=num_warps)
    return y.view(x.shape), rstd.view(x.shape[:-1])


@rms_norm_forward.register_fake
def _rms_norm_forward_fake(x, weight, eps, offset):
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op('twinkle_triton::rms_norm_backward', mutates_args=())
def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                      offset: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dweight)``: dx like x (contiguous), dweight in weight's dtype."""
    x2d, dy2d = _rows(x), _rows(dy)
    n_rows, n_cols = x2d.shape
    dx = torch.empty_like(x2d)
    programs = _backward_programs(n_rows, x2d.device)
    dw_partial = torch.zeros(max(programs, 1), n_cols, dtype=torch.float32, device=x2d.device)
    if x2d.numel():
        block, num_warps = _launch_settings(n_cols)
        _rms_norm_backward_kernel[(programs,)](
            dy2d, x2d, weight.contiguous(), rstd.contiguous(), dx, dw_partial, dy2d.stride(0), x2d.stride(0),
            dx.stride(0), n_rows, n_cols, offset, triton.cdiv(n_rows, programs), BLOCK=block, num_warps=num_warps)
    return dx.view(x.shape), dw_partial.sum(0).to(weight.dtype)


@rms_norm_backward.register_fake
def _rms_norm_backward_fake(dy, x, weight, rstd, offset):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


differentiate(rms_norm_forward, rms_norm_backward)


def rms_norm(x, weight, eps, offset):
    return rms_norm_forward(x, weight, eps, offset)[0]
