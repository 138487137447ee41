"""SwiGLU forward + backward: ``silu(gate) * up`` on (tokens, intermediate) activations.

Bytes moved (the minimum, s = element size): forward reads gate and up, writes the output;
backward reads the output's gradient, gate and up, writes dgate and dup: 8*N*I*s.
"""
import torch

import harness

OP = 'swiglu'


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


def limit(case: dict, settings: harness.Settings) -> dict:
    shape, dtype = (case['rows'], case['intermediate']), getattr(torch, case['dtype'])
    bytes_moved = 8 * shape[0] * shape[1] * dtype.itemsize
    outputs = harness.nbytes(*[(shape, dtype)] * 3)  # output, dgate, dup
    return harness.bandwidth_limit(bytes_moved, outputs, settings)


if __name__ == '__main__':
    import sys

    import run
    run.main(['--ops', OP, *sys.argv[1:]])
