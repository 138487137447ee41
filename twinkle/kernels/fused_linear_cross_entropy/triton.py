"""Triton step for the chunked host loop: one program per token row, online softmax over V in blocks.

Pass 1 streams the row once for the running max, the rescaled sum of exponentials and (for label
smoothing) the sum of logits; pass 2, only when gradients are wanted, streams it again and
overwrites each logit with its gradient. The GEMMs stay with torch (cuBLAS); the chunk loop is
the one the cpu and npu backends share, inside the ops ``twinkle_triton::
fused_linear_cross_entropy_forward`` / ``_backward``. The logits buffer is fp32, so the math is
fp32 whatever the input dtype.
"""
import torch
import triton
import triton.language as tl

from .chunked import chunked_passes, define_ops

MAX_BLOCK = 16384
MAX_ROWS = 2048  # not measured (no GPU here): GPU GEMMs need many rows to fill the SMs
CHUNK_BUDGET_BYTES = 1 << 30


@triton.jit
def _softcapped(x, softcap, HAS_SOFTCAP: tl.constexpr):
    """softcap * tanh(x / softcap) and the tanh, written with exp (libdevice.tanh is not portable)."""
    if HAS_SOFTCAP:
        tanh = 1.0 - 2.0 / (tl.exp(2.0 * x / softcap) + 1.0)
        x = softcap * tanh
    else:
        tanh = x
    return x, tanh


@triton.jit
def _cross_entropy_rows_kernel(LOGITS, stride, LABELS, LOSS, n_cols, label_smoothing, softcap,
                               HAS_GRAD: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = LOGITS + row * stride
    label = tl.load(LABELS + row)
    cols = tl.arange(0, BLOCK)
    row_max = -float('inf')
    exp_sum = 0.0
    logit_sum = 0.0
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        x = tl.load(row_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
        x, _ = _softcapped(x, softcap, HAS_SOFTCAP)
        x = tl.where(mask, x, -float('inf'))
        new_max = tl.maximum(row_max, tl.max(x, axis=0))
        exp_sum = exp_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        row_max = new_max
        logit_sum += tl.sum(tl.where(mask, x, 0.0), axis=0)
    target, _ = _softcapped(tl.load(row_ptr + label).to(tl.float32), softcap, HAS_SOFTCAP)
    lse = row_max + tl.log(exp_sum)
    tl.store(LOSS + row, lse - (1.0 - label_smoothing) * target - label_smoothing / n_cols * logit_sum)
    if HAS_GRAD:
        for start in range(0, n_cols, BLOCK):
            offsets = start + cols
            mask = offsets < n_cols
            x = tl.load(row_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            x, tanh = _softcapped(x, softcap, HAS_SOFTCAP)
            grad = tl.exp(x - lse) - label_smoothing / n_cols
            grad = tl.where(offsets == label, grad - (1.0 - label_smoothing), grad)
            if HAS_SOFTCAP:
                grad = grad * (1.0 - tanh * tanh)
            tl.store(row_ptr + offsets, grad, mask=mask)


def _launch_settings(n_cols: int):
    block = min(triton.next_power_of_2(n_cols), MAX_BLOCK)
    return block, 16 if block >= 8192 else 8 if block >= 2048 else 4


def triton_chunk_step(logits, labels, want_grad, label_smoothing, softcap):
    """The Triton twin of ``chunked.torch_chunk_step`` (same contract)."""
    rows, n_cols = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    block, num_warps = _launch_settings(n_cols)
    _cross_entropy_rows_kernel[(rows,)](
        logits, logits.stride(0), labels, loss, n_cols, label_smoothing, 1.0 if softcap is None else softcap,
        HAS_GRAD=want_grad, HAS_SOFTCAP=softcap is not None, BLOCK=block, num_warps=num_warps)
    return loss


fused_linear_cross_entropy = define_ops('twinkle_triton',
                                        chunked_passes(triton_chunk_step, MAX_ROWS, CHUNK_BUDGET_BYTES))
