"""MoE combine in Triton: the ops of routing.py over the kernels of triton_rows.py
(``twinkle_triton::moe_unpermute_*``)."""
from .. import triton_rows
from ..routing import define_unpermute

moe_unpermute = define_unpermute('twinkle_triton', triton_rows)
