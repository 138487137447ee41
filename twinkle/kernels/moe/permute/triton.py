"""MoE dispatch in Triton: the ops of routing.py over the kernels of triton_rows.py
(``twinkle_triton::moe_permute_*``); the sort stays with torch."""
from .. import triton_rows
from ..routing import define_permute

moe_permute = define_permute('twinkle_triton', triton_rows)
