"""Fused linear + cross-entropy (the LM head and its loss), forward + backward.

GEMM-bound: logits = x W^T, dx = dlogits W and dW = dlogits^T x are 2*N*H*V FLOPs each, 6*N*H*V in
all; the softmax over (N, V) is a bandwidth term on top. The limit is those FLOPs at the measured
fp32 GEMM rate; the three GEMMs are also timed alone at the real shapes.
"""
import torch

import harness

OP = 'fused_linear_cross_entropy'
IGNORE_INDEX = -100


def cases(size: str) -> list:
    if size == 'quick':
        return [{'tokens': 256, 'hidden': 256, 'vocab': 16384, 'dtype': 'float32'}]
    default = {'tokens': 1024, 'hidden': 512, 'vocab': 151936, 'dtype': 'float32'}
    if size == 'full':
        return [default, {'tokens': 4096, 'hidden': 1024, 'vocab': 151936, 'dtype': 'float32'}]
    return [default]


def label(case: dict) -> str:
    return f"N={case['tokens']} H={case['hidden']} V={case['vocab']} {case['dtype']}"


def workload(case: dict) -> harness.Workload:
    tokens, hidden, vocab, dtype = _dims(case)
    x = torch.randn(tokens, hidden, dtype=dtype, requires_grad=True)
    weight = (torch.randn(vocab, hidden) / hidden ** 0.5).to(dtype).requires_grad_()
    target = torch.randint(vocab, (tokens,))
    target[::16] = IGNORE_INDEX  # some positions masked, as prompts and padding are
    # backend args: hidden, weight, labels, bias, ignore_index, reduction, label_smoothing, softcap, chunk_size
    return harness.Workload(args=(x, weight, target, None, IGNORE_INDEX, 'mean', 0.0, None, None),
                            leaves=(x, weight))


def limit(case: dict, settings: harness.Settings) -> dict:
    tokens, hidden, vocab, dtype = _dims(case)
    outputs = harness.nbytes(((tokens, hidden), dtype), ((vocab, hidden), dtype))  # dx, dW
    return harness.compute_limit(6 * tokens * hidden * vocab, outputs, settings,
                                 gemms_ms=_three_gemms_ms(tokens, hidden, vocab, dtype))


def _three_gemms_ms(tokens: int, hidden: int, vocab: int, dtype: torch.dtype) -> float:
    """The GEMMs alone, into pre-faulted outputs: what remains when nothing else costs."""
    x, weight = torch.randn(tokens, hidden, dtype=dtype), torch.randn(vocab, hidden, dtype=dtype)
    grad_logits = torch.randn(tokens, vocab, dtype=dtype)
    logits, grad_x, grad_weight = torch.empty_like(grad_logits), torch.empty_like(x), torch.empty_like(weight)

    def gemms():
        torch.mm(x, weight.t(), out=logits)
        torch.mm(grad_logits, weight, out=grad_x)
        torch.mm(grad_logits.t(), x, out=grad_weight)
    return harness.median_ms(gemms, reps=3)


def _dims(case: dict) -> tuple:
    return case['tokens'], case['hidden'], case['vocab'], getattr(torch, case['dtype'])


if __name__ == '__main__':
    import sys

    import run
    run.main(['--ops', OP, *sys.argv[1:]])
