"""Fused linear log-probs (RL's per-token log-probs under the LM head), forward + backward.

GEMM-bound like fused linear cross-entropy: logits = x W^T, then dx and dW, 6*N*H*V FLOPs (the
fused backends recompute the logits in backward: a fourth GEMM, 8*N*H*V). The limit and the
three GEMMs alone are FLCE's (``bench_fused_linear_cross_entropy.limit``, same shapes).

Variants: eager and torch.compile of the reference, the registry's backends, and the peer:
liger-kernel has no public log-prob op; its GRPO loss runs one, ``_ChunkedSelectiveLogProbFunction``
(``liger_kernel.chunked_loss.fused_linear_ppo``, private, log-probs only: no entropy, no
ignore_index), timed here as 'liger'. So the case has no ignored tokens and no entropy: every
variant then computes the same thing; the entropy case ('entropy': True) runs without liger.
"""
from typing import Callable, Dict

import torch

import bench_fused_linear_cross_entropy as flce
import harness
import report

OP = 'fused_linear_logprobs'
TEMPERATURE = 0.7
LIGER_VOCAB_CHUNK = 4096  # liger's own default for its GRPO loss


def cases(size: str) -> list:
    if size == 'quick':
        return [{'tokens': 256, 'hidden': 256, 'vocab': 16384, 'dtype': 'float32', 'entropy': False}]
    default = {'tokens': 1024, 'hidden': 512, 'vocab': 151936, 'dtype': 'float32', 'entropy': False}
    if size == 'full':
        return [default, {**default, 'entropy': True}]
    return [default]


def label(case: dict) -> str:
    return f"{flce.label(case)}{' +entropy' if case['entropy'] else ''}"


def workload(case: dict) -> harness.Workload:
    tokens, hidden, vocab, dtype = flce._dims(case)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=generator).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden, generator=generator) / hidden ** 0.5).to(dtype).requires_grad_()
    target = torch.randint(vocab, (tokens,), generator=generator)
    grads = [torch.randn(tokens, generator=generator) for _ in range(1 + case['entropy'])]  # per-token, as RL's
    # backend args: hidden, weight, labels, temperature, ignore_index, return_entropy, chunk_size
    return harness.Workload(args=(x, weight, target, TEMPERATURE, -100, case['entropy'], None), leaves=(x, weight),
                            grad_outputs=grads)


def limit(case: dict, settings: harness.Settings) -> dict:
    return flce.limit(case, settings)


def variants(wanted=frozenset()) -> Dict[str, str]:
    """The harness's variants and 'liger' -> None when it runs here, else why not."""
    found = harness.variants(OP, wanted)
    from twinkle.backends import has_package
    found['liger'] = ('not asked for (--variants)' if wanted and 'liger' not in wanted else
                      None if has_package('liger_kernel') else 'needs liger_kernel: pip install "twinkle[liger]"')
    return found


def make_variant(variant: str) -> Callable:
    """The function a variant times: the outputs that get upstream gradients (no empty entropy)."""
    if variant == 'liger':
        from liger_kernel.chunked_loss.fused_linear_ppo import _ChunkedSelectiveLogProbFunction

        def liger(hidden, weight, labels, temperature, ignore_index, return_entropy, chunk_size):
            if return_entropy:
                raise ValueError("liger's selective log-prob computes no entropy")
            return _ChunkedSelectiveLogProbFunction.apply(hidden, weight, labels, None, temperature,
                                                          LIGER_VOCAB_CHUNK)
        return liger
    registry = harness.load_op(OP)
    backend = registry.resolve(OP, 'reference' if variant in ('eager', 'compile') else variant)
    if variant == 'compile':
        backend = torch.compile(backend, dynamic=False)

    def step(hidden, weight, labels, temperature, ignore_index, return_entropy, chunk_size):
        logprobs, entropy = backend(hidden, weight, labels, temperature, ignore_index, return_entropy, chunk_size)
        return (logprobs, entropy) if return_entropy else logprobs
    return step


def bench_op(args, run_info: dict) -> dict:
    """run.bench_op with the liger peer among the variants (it is no registry backend of this op)."""
    found = variants(args.variants)
    settings = harness.SETTINGS[args.size]
    measured_cases = []
    for case in cases(args.size):
        measured = {'label': label(case), 'case': case, 'limit': limit(case, settings), 'variants': {}}
        print(f'{OP} {measured["label"]} limit: {report.limit_text(measured["limit"])}', flush=True)
        for variant in (v for v, why in found.items() if why is None and not (v == 'liger' and case['entropy'])):
            measured['variants'][variant] = result = harness.run_variant(OP, case, variant, settings)
            print(f'{OP} {measured["label"]} {variant}: {report.one_line(result)}', flush=True)
        measured_cases.append(measured)
    return {'run': run_info, 'skipped': {v: why for v, why in found.items() if why}, 'cases': measured_cases}


if __name__ == '__main__':
    import sys

    import run
    run.main(['--ops', OP, *sys.argv[1:]])
