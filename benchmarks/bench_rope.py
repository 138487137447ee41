"""Rotary position embedding of q and k, forward + backward (registry op 'rope', HF layout
(batch, heads, seq, head_dim), cos/sin (batch, seq, head_dim) without gradients, as HF builds them).

Bytes moved (the minimum, s = element size): forward reads q, k, cos and sin, writes the rotated
q and k; backward reads their gradients, cos and sin, writes dq and dk: 4*(|q| + |k|)*s + 4*|cos|*s.
"""
import torch

import harness

OP = 'rope'


def cases(size: str) -> list:
    if size == 'quick':
        return [{'batch': 1, 'q_heads': 8, 'kv_heads': 2, 'seq': 256, 'head_dim': 64, 'dtype': 'float32'}]
    return [{'batch': 4, 'q_heads': 32, 'kv_heads': 8, 'seq': 2048, 'head_dim': 128, 'dtype': 'float32'}]


def label(case: dict) -> str:
    return f"q {_shape(case, 'q_heads')} k {_shape(case, 'kv_heads')} {case['dtype']}"


def _shape(case: dict, heads: str) -> str:
    return 'x'.join(str(case[dim]) for dim in ('batch', heads, 'seq', 'head_dim'))


def _shapes(case: dict) -> tuple:
    batch, seq, head_dim = case['batch'], case['seq'], case['head_dim']
    return ((batch, case['q_heads'], seq, head_dim), (batch, case['kv_heads'], seq, head_dim),
            (batch, seq, head_dim))


def workload(case: dict) -> harness.Workload:
    q_shape, k_shape, cos_shape = _shapes(case)
    dtype = getattr(torch, case['dtype'])
    q = torch.randn(q_shape, dtype=dtype, requires_grad=True)
    k = torch.randn(k_shape, dtype=dtype, requires_grad=True)
    angles = torch.rand(cos_shape) * 6.3
    grads = (torch.randn(q_shape, dtype=dtype), torch.randn(k_shape, dtype=dtype))
    return harness.Workload(args=(q, k, angles.cos().to(dtype), angles.sin().to(dtype), 1),
                            leaves=(q, k), grad_outputs=grads)


def limit(case: dict, settings: harness.Settings) -> dict:
    q_shape, k_shape, cos_shape = _shapes(case)
    dtype = getattr(torch, case['dtype'])
    q_k = torch.Size(q_shape).numel() + torch.Size(k_shape).numel()
    bytes_moved = (4 * q_k + 4 * torch.Size(cos_shape).numel()) * dtype.itemsize
    outputs = harness.nbytes(*[(q_shape, dtype), (k_shape, dtype)] * 2)  # rotated q, k; dq, dk
    return harness.bandwidth_limit(bytes_moved, outputs, settings)


if __name__ == '__main__':
    import sys

    import run
    run.main(['--ops', OP, *sys.argv[1:]])
