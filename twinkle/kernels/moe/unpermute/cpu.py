"""MoE combine on CPU: the ops of routing.py over the CPU row kernels (``twinkle_cpu::moe_unpermute_*``)."""
from .. import cpu_rows
from ..routing import define_unpermute

moe_unpermute = define_unpermute('twinkle_cpu', cpu_rows)
