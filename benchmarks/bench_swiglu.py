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


class _Handover(torch.autograd.Function):
    """Makes a plain buffer a non-leaf result, in place, whose gradient ends here: as in an MLP,
    where dgate/dup flow into the projections' GEMMs, not into leaves. (Clones of leaves would
    not do: AccumulateGrad must copy a gradient that the workload still references -- the donated
    buffer itself -- which no MLP pays.)"""

    @staticmethod
    def forward(ctx, anchor, buffer):
        ctx.mark_dirty(buffer)
        return buffer

    @staticmethod
    def backward(ctx, grad):
        return None, None


def workload_for(case: dict, variant: str) -> harness.Workload:
    """For the inplace variant gate and up are what an MLP hands over: non-leaf results, refilled
    (untimed) before every step because backward overwrote them with dgate and dup."""
    work = workload(case)
    if not variant.endswith(':inplace'):
        return work
    sources = [leaf.detach() for leaf in work.args]
    donated = tuple(torch.empty_like(source) for source in sources)
    anchor = torch.zeros((), requires_grad=True)

    def refill():
        for target, source in zip(donated, sources):
            target.detach_()  # drop last step's history: no chain of handovers
            with torch.no_grad():
                target.copy_(source)
            _Handover.apply(anchor, target)
    refill()
    return harness.Workload(args=donated, leaves=(), grad_outputs=work.grad_outputs, before_step=refill)


def limit(case: dict, settings: harness.Settings) -> dict:
    shape, dtype = (case['rows'], case['intermediate']), getattr(torch, case['dtype'])
    bytes_moved = 8 * shape[0] * shape[1] * dtype.itemsize
    outputs = harness.nbytes(*[(shape, dtype)] * 3)  # output, dgate, dup
    return harness.bandwidth_limit(bytes_moved, outputs, settings)


if __name__ == '__main__':
    import sys

    import run
    run.main(['--ops', OP, *sys.argv[1:]])
