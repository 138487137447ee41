"""Grouped SwiGLU experts with a Triton grouped GEMM (the GEMM of function.py's shared ops,
``twinkle_triton::grouped_*``).

``rows``: one program per (tile of at most BLOCK_M rows inside one group, block of BLOCK_N
columns), so no tile straddles two experts and experts without tokens cost nothing. The tile list
is computed on the device, never read to the host: the grid is an upper bound of the tiles,
rows // BLOCK_M + experts (each group wastes less than one tile), and the surplus programs exit
at once. ``per_group``: one program per (expert, BLOCK_M x BLOCK_N block of its output), walking
the expert's rows as the reduction dim. Operands are multiplied in their dtype with fp32
accumulation (fp32 operands in IEEE fp32, not TF32), rounded once on store.
A fixed tile config: multi-config autotuning needs a GPU, and this backend has only been run in
the interpreter (on CUDA the ``grouped_mm`` backend comes first).
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .function import define_grouped_experts

BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 32


@triton.jit
def _rows_kernel(A, B, OUT, TILE_EXPERT, FIRST_TILE, GROUP_START, GROUP_END, n_experts, K, N,
                 stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_om, stride_on,
                 ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    tile = tl.program_id(0)
    expert = tl.load(TILE_EXPERT + tile).to(tl.int64)
    if expert >= n_experts:  # a surplus program of the upper-bound grid
        return
    first_row = tl.load(GROUP_START + expert) + (tile - tl.load(FIRST_TILE + expert)) * BLOCK_M
    rows = first_row.to(tl.int64) + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < tl.load(GROUP_END + expert)
    col_mask = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(A + rows[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(B + expert * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    out = OUT + rows[:, None] * stride_om + cols[None, :] * stride_on
    mask = row_mask[:, None] & col_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(out, mask=mask, other=0.0).to(tl.float32)
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _per_group_kernel(A, B, OUT, GROUP_START, GROUP_END, M, N,
                      stride_ar, stride_am, stride_br, stride_bn, stride_oe, stride_om, stride_on,
                      PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    expert = tl.program_id(0).to(tl.int64)
    ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = ms < M
    n_mask = ns < N
    end = tl.load(GROUP_END + expert)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(tl.load(GROUP_START + expert), end, BLOCK_K):
        rs = (start + tl.arange(0, BLOCK_K)).to(tl.int64)
        r_mask = rs < end
        a = tl.load(A + rs[:, None] * stride_ar + ms[None, :] * stride_am,
                    mask=r_mask[:, None] & m_mask[None, :], other=0.0)
        b = tl.load(B + rs[:, None] * stride_br + ns[None, :] * stride_bn,
                    mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)
    tl.store(OUT + expert * stride_oe + ms[:, None] * stride_om + ns[None, :] * stride_on,
             acc.to(OUT.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _precision(dtype: torch.dtype) -> str:
    return 'ieee' if dtype == torch.float32 else 'tf32'  # the latter is ignored for 16-bit operands


class Groups(NamedTuple):
    """Per expert: its first row, its end row and its first tile; per program of the ``rows``
    grid: its expert (``experts`` for a surplus program)."""
    starts: torch.Tensor
    ends: torch.Tensor
    first_tiles: torch.Tensor
    tile_experts: torch.Tensor


class TritonGroupedGemm:
    @staticmethod
    def groups(tokens_per_expert, rows):
        ends = torch.cumsum(tokens_per_expert, 0)
        tiles = triton.cdiv(tokens_per_expert, BLOCK_M)
        tile_ends = torch.cumsum(tiles, 0)
        programs = torch.arange(rows // BLOCK_M + tokens_per_expert.shape[0], device=tokens_per_expert.device)
        return Groups(ends - tokens_per_expert, ends, tile_ends - tiles,
                      torch.searchsorted(tile_ends, programs, right=True))

    @staticmethod
    def rows(a, b, groups, out=None, accumulate=False):
        if out is None:
            out = a.new_empty(a.shape[0], b.shape[2])
        n_cols = b.shape[2]
        if a.shape[0] and n_cols:
            _rows_kernel[(groups.tile_experts.shape[0], triton.cdiv(n_cols, BLOCK_N))](
                a, b, out, groups.tile_experts, groups.first_tiles, groups.starts, groups.ends, groups.ends.shape[0],
                a.shape[1], n_cols,
                a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), out.stride(0), out.stride(1),
                ACCUMULATE=accumulate, PRECISION=_precision(a.dtype),
                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
        return out

    @staticmethod
    def per_group(a, b, groups, out=None):
        experts, m, n = groups.ends.shape[0], a.shape[1], b.shape[1]
        if out is None:
            out = a.new_empty(experts, m, n)
        if out.numel():
            _per_group_kernel[(experts, triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))](
                a, b, out, groups.starts, groups.ends, m, n, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                out.stride(0), out.stride(1), out.stride(2), PRECISION=_precision(a.dtype),
                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
        return out


grouped_experts = define_grouped_experts('twinkle_triton', TritonGroupedGemm())
