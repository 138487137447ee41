"""The fast CPU path: the shared chunked host loop with the C++ step of csrc/cross_entropy.cpp
(one exponential per logit, the row reread from L2: 2.6x faster than the in-place PyTorch step at
128 x 151936), as the ops ``twinkle_cpu::fused_linear_cross_entropy_forward`` / ``_backward``. Where
the C++ kernels cannot be built, the PyTorch step runs instead, and the log says why.

Rows per chunk: 256 per intra-op thread (MKL splits a GEMM's rows over its threads, so the knee
where the per-chunk GEMMs reach full-GEMM speed moves with them), evened out over the tokens.
Measured on this repo's 2-core host (N=1024 with 960 counted tokens, H=512, V=151936, fp32, 2
threads): the logits GEMMs cost 1.34x the unchunked GEMM in chunks of 128 rows, 1.12x at 256 and
1.00x at 480; the whole op, fwd+bwd, 3454 ms at 128 rows and 2889-3234 ms at 480 (the host is
noisy). Every chunk re-packs W (V x H) for too little work below the knee. The memory: 480 x
151936 fp32 logits are 278 MiB, still a fraction of eager PyTorch's 1.7 GiB above the dW + dH
floor; the 320 MiB budget trims rows past that (V ~ 160k at 512 rows).
"""
import torch

from twinkle.utils.logger import get_logger

from .. import native
from .chunked import chunked_passes, define_ops, torch_chunk_step

logger = get_logger(__name__)

ROWS_PER_THREAD = 256
CHUNK_BUDGET_BYTES = 320 << 20


def max_rows() -> int:
    return ROWS_PER_THREAD * max(1, torch.get_num_threads())


def native_chunk_step(logits, labels, want_grad, label_smoothing, softcap):
    """``chunked.torch_chunk_step``'s contract, in C++."""
    return torch.ops.twinkle_cpu.cross_entropy_rows_(logits, labels, want_grad, label_smoothing, softcap)


def _cross_entropy_rows_fake(logits, labels, want_grad, label_smoothing, softcap):
    return logits.new_empty(logits.shape[0])


def _chosen_step():
    why_not = native.cpu_check()
    if why_not is None:
        return native_chunk_step
    logger.warning('fused_linear_cross_entropy cpu: the PyTorch chunk step runs (C++ kernels unavailable: %s)',
                   why_not)
    return torch_chunk_step


STEP = _chosen_step()
if STEP is native_chunk_step:
    torch.library.register_fake('twinkle_cpu::cross_entropy_rows_')(_cross_entropy_rows_fake)

fused_linear_cross_entropy = define_ops('twinkle_cpu', chunked_passes(STEP, max_rows, CHUNK_BUDGET_BYTES))
