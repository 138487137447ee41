"""MoE dispatch on CPU: the ops of routing.py over the CPU row kernels (``twinkle_cpu::moe_permute_*``)."""
from .. import cpu_rows
from ..routing import define_permute

moe_permute = define_permute('twinkle_cpu', cpu_rows)
