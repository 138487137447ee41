"""Ascend NPUs: the shared chunked host loop and in-place PyTorch step (the ops
``twinkle_npu::fused_linear_cross_entropy_*``), every torch op inside running on the NPU through
torch_npu. Bigger chunks than on CPU (not measured: no NPU here): NPU GEMMs want more rows to
fill the cube units, and a few hundred MB is small against its HBM.
"""
from twinkle.backends.npu import torch_npu

from .chunked import chunked_passes, define_ops, torch_chunk_step

MAX_ROWS = 1024
CHUNK_BUDGET_BYTES = 512 << 20

torch_npu()  # registers the 'npu' device with torch (a clear error naming the extra if missing)
fused_linear_cross_entropy = define_ops('twinkle_npu', chunked_passes(torch_chunk_step, MAX_ROWS, CHUNK_BUDGET_BYTES))
