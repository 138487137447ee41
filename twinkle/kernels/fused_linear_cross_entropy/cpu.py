"""The fast CPU path: the shared chunked host loop with the C++ step of csrc/cross_entropy.cpp
(one exponential per logit, the row reread from L2: 2.6x faster than the in-place PyTorch step at
128 x 151936), as the ops ``twinkle_cpu::fused_linear_cross_entropy_forward`` / ``_backward``. Where
the C++ kernels cannot be built, the PyTorch step runs instead, and the log says why.

128 rows per chunk. This is the knee measured on this repo's host (Xeon Sapphire Rapids, MKL,
N=1024, H=512, V=151936, fp32, one thread, CPU time). Against the unchunked GEMMs, the three
per-chunk GEMMs cost 1.21x at 96 rows, 1.09x at 112, 1.07x at 120, 1.00x at 128 and 0.96x at
144. With fewer rows, every chunk re-streams W and dW (V x H) from memory for too little work.
More rows barely help speed and cost memory linearly: 128 x 151936 fp32 logits are 74 MiB,
which is 0.05x of eager PyTorch's 1.5 GiB above the dW + dH floor. The 128 MiB budget only
trims rows past V ~ 260k (~175k for bf16 weights, ~130k with a softcap).
"""
import torch

from twinkle.utils.logger import get_logger

from .. import native
from .chunked import chunked_passes, define_ops, torch_chunk_step

logger = get_logger(__name__)

MAX_ROWS = 128
CHUNK_BUDGET_BYTES = 128 << 20


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

fused_linear_cross_entropy = define_ops('twinkle_cpu', chunked_passes(STEP, MAX_ROWS, CHUNK_BUDGET_BYTES))
