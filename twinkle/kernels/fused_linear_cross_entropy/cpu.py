"""The fast CPU path: the shared chunked host loop with the in-place PyTorch step, as the ops
``twinkle_cpu::fused_linear_cross_entropy_forward`` / ``_backward``.

128 rows per chunk. This is the knee measured on this repo's host (Xeon Sapphire Rapids, MKL,
N=1024, H=512, V=151936, fp32, one thread, CPU time). Against the unchunked GEMMs, the three
per-chunk GEMMs cost 1.21x at 96 rows, 1.09x at 112, 1.07x at 120, 1.00x at 128 and 0.96x at
144. With fewer rows, every chunk re-streams W and dW (V x H) from memory for too little work.
More rows barely help speed and cost memory linearly: 128 x 151936 fp32 logits are 74 MiB,
which is 0.05x of eager PyTorch's 1.5 GiB above the dW + dH floor. The 128 MiB budget only
trims rows past V ~ 260k (~175k for bf16 weights, ~130k with a softcap).
"""
from .chunked import chunked_passes, define_ops, torch_chunk_step

MAX_ROWS = 128
CHUNK_BUDGET_BYTES = 128 << 20

fused_linear_cross_entropy = define_ops('twinkle_cpu', chunked_passes(torch_chunk_step, MAX_ROWS, CHUNK_BUDGET_BYTES))
