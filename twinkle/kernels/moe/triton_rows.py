"""Triton kernels that move token rows: the row kernels of the Triton backends of moe_permute and
moe_unpermute (the contract is in routing.py). One program per output row, the hidden dim walked
in blocks; math in fp32, rounded once on store.

- ``copy_rows``: out[r] = scale[slot] * src[slot // k] for the slot row r came from, and optionally
  the dot product of src[slot // k] with other[r]. Dispatch (scale 1) and the combine's backward
  (scale = routing weight, dot = routing-weight gradient).
- ``sum_rows``: out[t] = sum_j weight[t, j] * src[row_map[t, j]]. The combine (weights) and the
  dispatch's backward (no weights).
"""
import torch
import triton
import triton.language as tl

MAX_BLOCK = 4096


@triton.jit
def _copy_rows_kernel(SRC, SLOT_OF_ROW, OUT, SCALE, OTHER, DOT, top_k, n_cols, stride_src, stride_out, stride_other,
                      HAS_SCALE: tl.constexpr, HAS_DOT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOT_OF_ROW + row)
    src = SRC + (slot // top_k) * stride_src
    scale = 1.0
    if HAS_SCALE:
        scale = tl.load(SCALE + slot).to(tl.float32)
    dot = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_DOT:
            other = tl.load(OTHER + row * stride_other + cols, mask=mask, other=0.0).to(tl.float32)
            dot += tl.sum(x * other, axis=0)
        tl.store(OUT + row * stride_out + cols, (x * scale).to(OUT.dtype.element_ty), mask=mask)
    if HAS_DOT:
        tl.store(DOT + row, dot)


@triton.jit
def _sum_rows_kernel(SRC, ROW_MAP, WEIGHTS, OUT, top_k, n_cols, stride_src, stride_out,
                     HAS_WEIGHTS: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for j in range(0, top_k):
            row = tl.load(ROW_MAP + token * top_k + j)
            x = tl.load(SRC + row * stride_src + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_WEIGHTS:
                x = x * tl.load(WEIGHTS + token * top_k + j).to(tl.float32)
            acc += x
        tl.store(OUT + token * stride_out + cols, acc.to(OUT.dtype.element_ty), mask=mask)


def _block(n_cols: int) -> int:
    return min(triton.next_power_of_2(max(n_cols, 1)), MAX_BLOCK)


def copy_rows(src, slot_of_row, top_k, scale=None, dot_with=None):
    """(rows copied, dot products or None); ``src`` rows are tokens, one output row per slot."""
    src = src.contiguous()
    out = src.new_empty(slot_of_row.numel(), src.shape[1])
    dot = None if dot_with is None else torch.empty(out.shape[0], dtype=torch.float32, device=src.device)
    if out.shape[0]:
        other = src if dot_with is None else dot_with.contiguous()
        _copy_rows_kernel[(out.shape[0],)](
            src, slot_of_row, out, src if scale is None else scale.contiguous(), other, out if dot is None else dot,
            top_k, src.shape[1], src.stride(0), out.stride(0), other.stride(0),
            HAS_SCALE=scale is not None, HAS_DOT=dot is not None, BLOCK=_block(src.shape[1]))
    return out, dot


def sum_rows(src, row_map, weights=None):
    """(tokens, H): each token's k rows of ``src`` (weighted when ``weights`` is given) summed."""
    src, row_map = src.contiguous(), row_map.contiguous()
    out = src.new_empty(row_map.shape[0], src.shape[1])
    if out.numel():
        _sum_rows_kernel[(out.shape[0],)](
            src, row_map, src if weights is None else weights.contiguous(), out, row_map.shape[1], src.shape[1],
            src.stride(0), out.stride(0), HAS_WEIGHTS=weights is not None, BLOCK=_block(src.shape[1]))
    return out
