"""SwiGLU forward + backward: ``silu(gate) * up`` on (tokens, intermediate) activations.

Bytes moved (the minimum, s = element size): forward reads gate and up, writes the output;
backward reads the output's gradient, gate and up, writes dgate and dup: 8*N*I*s.
"""
import torch

import harness

OP = 'swiglu'
BACKEND_VARIANTS = ('cpu:inplace',)  # backward writes dgate/dup over gate/up, as TwinkleSwiGLUMLP runs it


def cases(size: str) -> list:
    if size == 'quick':
        return [{'rows': 1024, 'intermediate': 2048, 'dtype': 'float32'}]
    return [{'rows': 8192, 'intermediate': 11008, 'dtype': 'float32'}]


def label(case: dict) -> str:
    return f"{case['rows']}x{case['intermediate']} {case['dtype']}"


def workload(case: dict) -> harness.Workload:
    shape, dtype = (case['rows'], case['intermediate']), getattr(torch, case['dtype'])
    gate = torch.randn(shape, dtype=dtype, requires_grad=True)
    up = torch.randn(shape, dtype=dtype, requires_grad=True)
    return harness.Workload(args=(gate, up), leaves=(gate, up), grad_outputs=(torch.randn(shape, dtype=dtype),))


def workload_for(case: dict, variant: str) -> harness.Workload:
    """For the inplace variant gate and up are what an MLP hands over: non-leaf results (here clones of
    the leaves, through which the gradients reach them without a copy), refilled before every step
    because backward overwrote them."""
    work = workload(case)
    if not variant.endswith(':inplace'):
        return work
    leaves = work.args
    donated = tuple(leaf.clone() for leaf in leaves)

    def refill():
        with torch.no_grad():
            for target, source in zip(donated, leaves):
                target.copy_(source)
    return harness.Workload(args=donated, leaves=leaves, grad_outputs=work.grad_outputs, before_step=refill)


def limit(case: dict, settings: harness.Settings) -> dict:
    shape, dtype = (case['rows'], case['intermediate']), getattr(torch, case['dtype'])
    bytes_moved = 8 * shape[0] * shape[1] * dtype.itemsize
    outputs = harness.nbytes(*[(shape, dtype)] * 3)  # output, dgate, dup
    return harness.bandwidth_limit(bytes_moved, outputs, settings)


if __name__ == '__main__':
    import sys

    import run
    run.main(['--ops', OP, *sys.argv[1:]])
