"""Triton steps for the chunked host loop: one program per token row, streaming V in blocks.

Forward, one pass: online softmax over z = logits / temperature keeping the running max m, the
rescaled sum of exponentials S and, for the entropy, Q = sum(exp(z - m) * (z - m)) (rescaled as
m moves), so ``logsumexp = m + log S`` and ``entropy = log S - Q / S`` -- the shifted sum keeps
the entropy exact when the logits are large. Backward, one more pass, overwriting each logit with
``-p * (g_lp + g_ent * (z - E[z]))`` (+ g_lp at the label). The GEMMs stay with torch (cuBLAS)
in the loop the chunked backend shares (ops ``twinkle_triton::fused_linear_logprobs_forward`` /
``_backward``). The buffer is fp32, so the math is fp32 whatever the input dtype (bf16 upcast).
"""
import torch
import triton
import triton.language as tl

from .chunked import Steps, define_ops

MAX_BLOCK = 16384
MAX_ROWS = 2048  # as FLCE's triton backend: GPU GEMMs need many rows to fill the SMs
CHUNK_BUDGET_BYTES = 1 << 30


@triton.jit
def _logprob_rows_kernel(LOGITS, stride, LABELS, LOGPROB, ENTROPY, LSE, n_cols, inv_temperature,
                         HAS_ENTROPY: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = LOGITS + row * stride
    cols = tl.arange(0, BLOCK)
    row_max = -float('inf')
    exp_sum = 0.0
    shifted_sum = 0.0  # sum(exp(z - row_max) * (z - row_max))
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        z = tl.load(row_ptr + start + cols, mask=mask, other=-float('inf')).to(tl.float32) * inv_temperature
        new_max = tl.maximum(row_max, tl.max(z, axis=0))
        rescale = tl.exp(row_max - new_max)
        exps = tl.exp(z - new_max)
        if HAS_ENTROPY:
            # moving the max by d turns sum(e * s) into sum(e * (s - d)); nothing to move before the first block
            moved_by = tl.where(exp_sum > 0, new_max - row_max, 0.0)
            shifted = tl.where(mask, z - new_max, 0.0)
            shifted_sum = rescale * (shifted_sum - moved_by * exp_sum) + tl.sum(exps * shifted, axis=0)
        exp_sum = exp_sum * rescale + tl.sum(exps, axis=0)
        row_max = new_max
    log_norm = tl.log(exp_sum)
    target = tl.load(row_ptr + tl.load(LABELS + row)).to(tl.float32) * inv_temperature
    tl.store(LOGPROB + row, target - row_max - log_norm)
    tl.store(LSE + row, row_max + log_norm)
    if HAS_ENTROPY:
        tl.store(ENTROPY + row, log_norm - shifted_sum / exp_sum)


@triton.jit
def _logprob_grad_rows_kernel(LOGITS, stride, LABELS, LSE, GRAD_LOGPROB, GRAD_ENTROPY, MEAN_LOGIT, n_cols,
                              inv_temperature, HAS_ENTROPY: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = LOGITS + row * stride
    label = tl.load(LABELS + row)
    lse = tl.load(LSE + row)
    grad_logprob = tl.load(GRAD_LOGPROB + row)
    cols = tl.arange(0, BLOCK)
    for start in range(0, n_cols, BLOCK):
        offsets = start + cols
        mask = offsets < n_cols
        z = tl.load(row_ptr + offsets, mask=mask, other=0.0).to(tl.float32) * inv_temperature
        weight = grad_logprob
        if HAS_ENTROPY:
            weight = weight + tl.load(GRAD_ENTROPY + row) * (z - tl.load(MEAN_LOGIT + row))
        grad = -tl.exp(z - lse) * weight
        grad = tl.where(offsets == label, grad + grad_logprob, grad)
        tl.store(row_ptr + offsets, grad, mask=mask)


def _launch_settings(n_cols: int):
    block = min(triton.next_power_of_2(n_cols), MAX_BLOCK)
    return block, 16 if block >= 8192 else 8 if block >= 2048 else 4


def triton_forward_step(logits, labels, inv_temperature, want_entropy, scratch):
    """The Triton twin of ``chunked.torch_forward_step`` (same contract)."""
    rows, n_cols = logits.shape
    logprob, lse = (torch.empty(rows, dtype=torch.float32, device=logits.device) for _ in range(2))
    entropy = torch.empty_like(lse) if want_entropy else None
    block, num_warps = _launch_settings(n_cols)
    _logprob_rows_kernel[(rows,)](
        logits, logits.stride(0), labels.contiguous(), logprob, lse if entropy is None else entropy,  # unwritten
        lse, n_cols, inv_temperature, HAS_ENTROPY=want_entropy, BLOCK=block, num_warps=num_warps)
    return logprob, entropy, lse


def triton_backward_step(logits, labels, inv_temperature, lse, grad_logprob, grad_entropy, mean_logit,
                         scratch):
    """The Triton twin of ``chunked.torch_backward_step`` (same contract; the host hands it
    contiguous row vectors)."""
    rows, n_cols = logits.shape
    block, num_warps = _launch_settings(n_cols)
    has_entropy = grad_entropy is not None
    entropy_rows = (grad_entropy, mean_logit) if has_entropy else (lse, lse)  # unread without the entropy
    _logprob_grad_rows_kernel[(rows,)](
        logits, logits.stride(0), labels.contiguous(), lse, grad_logprob, *entropy_rows, n_cols, inv_temperature,
        HAS_ENTROPY=has_entropy, BLOCK=block, num_warps=num_warps)


fused_linear_logprobs = define_ops('twinkle_triton', Steps(triton_forward_step, triton_backward_step, scratch=False),
                                   MAX_ROWS, CHUNK_BUDGET_BYTES)
