"""RMSNorm forward + backward over rows of a (tokens, hidden) activation.

Bytes moved (the minimum any implementation reads and writes, s = element size):
forward reads x and weight, writes y and the fp32 rstd per row; backward reads dy, x, weight and
rstd, writes dx and dweight: 5*N*H*s + 3*H*s + 8*N.
"""
import torch

import harness

OP = 'rms_norm'


def cases(size: str) -> list:
    if size == 'quick':
        return [{'rows': 1024, 'hidden': 1024, 'dtype': 'float32'}]
    return [{'rows': 8192, 'hidden': 4096, 'dtype': dtype} for dtype in ('float32', 'bfloat16')]


def label(case: dict) -> str:
    return f"{case['rows']}x{case['hidden']} {case['dtype']}"


def workload(case: dict) -> harness.Workload:
    dtype = getattr(torch, case['dtype'])
    x = torch.randn(case['rows'], case['hidden'], dtype=dtype, requires_grad=True)
    weight = (1 + 0.1 * torch.randn(case['hidden'])).to(dtype).requires_grad_()
    grad_y = torch.randn_like(x, requires_grad=False)
    return harness.Workload(args=(x, weight, 1e-6, 0.0), leaves=(x, weight), grad_outputs=(grad_y,))


def limit(case: dict, settings: harness.Settings) -> dict:
    rows, hidden, dtype = case['rows'], case['hidden'], getattr(torch, case['dtype'])
    size = dtype.itemsize
    bytes_moved = 5 * rows * hidden * size + 3 * hidden * size + 8 * rows
    outputs = harness.nbytes(((rows, hidden), dtype), ((rows,), torch.float32),   # y, rstd
                             ((rows, hidden), dtype), ((hidden,), dtype))         # dx, dweight
    return harness.bandwidth_limit(bytes_moved, outputs, settings)


if __name__ == '__main__':
    import sys

    import run
    run.main(['--ops', OP, *sys.argv[1:]])
