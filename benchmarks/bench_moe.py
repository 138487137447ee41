"""Qwen3-MoE sparse block (router + experts), forward + backward: Hugging Face's own experts
implementations against the block with twinkle's experts (moe_permute -> grouped_experts ->
moe_unpermute), each variant in fresh processes like every other benchmark (the fastest of
``ROUNDS`` rounds in alternating order, see ``bench_op``).

GEMM-bound. FLOPs, with S = tokens * top-k routed rows: the experts' three GEMMs are
2*S*H*2I + 2*S*I*H = 6*S*H*I forward and twice that backward; the router adds 2*T*H*E forward
and 4*T*H*E backward. The limit is those FLOPs at the fp32 GEMM rate measured in the same run
(also for bf16, whose GEMMs may run faster), and the experts' GEMMs alone at these shapes
(rows split evenly over the experts, outputs pre-faulted) are timed apart; both are probed before
and after the variants, keeping the faster.

Variants are not registry backends, so this script runs its own cases (``bench_op``) and its
child processes (``--measure``) with the harness's measurement. HF ``batched_mm`` gathers a
(2I, H) and an (H, I) weight copy per routed row; it is skipped when those copies alone would
exceed ``BATCHED_MM_LIMIT_BYTES`` (at the default shape they are 192 GiB).
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from typing import Callable, Dict, Optional

import torch

import harness

OP = 'moe'
HF_IMPLEMENTATIONS = {'hf_grouped_mm': 'grouped_mm', 'hf_eager': 'eager', 'hf_batched_mm': 'batched_mm'}
VARIANTS = ('hf_grouped_mm', 'hf_eager', 'hf_batched_mm', 'twinkle')
BASELINES = ('hf_grouped_mm', 'hf_eager')  # what RESULTS.md divides by (there is no 'eager' variant)
BATCHED_MM_LIMIT_BYTES = 8 * 2 ** 30
ROUNDS = 2


def cases(size: str) -> list:
    if size == 'quick':
        return [dict(tokens=512, hidden=256, intermediate=128, experts=16, top_k=4, dtype='float32')]
    default = dict(tokens=4096, hidden=1024, intermediate=512, experts=64, top_k=8)
    return [dict(default, dtype='float32'), dict(default, dtype='bfloat16')]


def label(case: dict) -> str:
    return (f"T={case['tokens']} H={case['hidden']} I={case['intermediate']} E={case['experts']} "
            f"top-{case['top_k']} {case['dtype']}")


def block(case: dict, seed: int = 0) -> torch.nn.Module:
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    config = Qwen3MoeConfig(hidden_size=case['hidden'], moe_intermediate_size=case['intermediate'],
                            num_experts=case['experts'], num_experts_per_tok=case['top_k'], norm_topk_prob=True)
    torch.manual_seed(seed)
    moe = Qwen3MoeSparseMoeBlock(config)
    for param in moe.parameters():
        torch.nn.init.normal_(param, std=config.initializer_range)
    return moe.to(getattr(torch, case['dtype']))


def workload(case: dict) -> harness.Workload:
    moe = block(case)
    dtype = getattr(torch, case['dtype'])
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, case['tokens'], case['hidden'], generator=generator).to(dtype).requires_grad_()
    grad = torch.randn(hidden.shape, generator=generator).to(dtype)
    return harness.Workload(args=(moe, hidden), leaves=(hidden, *moe.parameters()), grad_outputs=(grad,))


def make_variant(variant: str) -> Callable:
    """A step ``(block, hidden) -> output`` running the block with that experts implementation."""
    if variant == 'twinkle':
        from twinkle import kernels

        def step(moe, hidden):
            if not isinstance(moe.experts, kernels.TwinkleMoeExperts):
                kernels.kernelize(moe)
            return moe(hidden)
        return step
    implementation = HF_IMPLEMENTATIONS[variant]

    def step(moe, hidden):
        moe.experts.config._experts_implementation = implementation
        return moe(hidden)
    return step


def skipped(case: dict) -> Dict[str, str]:
    routed_rows = case['tokens'] * case['top_k']
    gathered = routed_rows * 3 * case['intermediate'] * case['hidden'] * getattr(torch, case['dtype']).itemsize
    if gathered > BATCHED_MM_LIMIT_BYTES:
        return {'hf_batched_mm': f'out of memory: gathers a weight copy per routed row, '
                                 f'{gathered / 2 ** 30:.0f} GiB in {case["dtype"]}'}
    return {}


def flops(case: dict) -> int:
    tokens, hidden, intermediate, experts, top_k = (case[k] for k in ('tokens', 'hidden', 'intermediate',
                                                                      'experts', 'top_k'))
    return 18 * tokens * top_k * hidden * intermediate + 6 * tokens * hidden * experts


def limit(case: dict, settings: harness.Settings) -> dict:
    dtype = getattr(torch, case['dtype'])
    tokens, hidden, intermediate, experts = case['tokens'], case['hidden'], case['intermediate'], case['experts']
    outputs = harness.nbytes(((tokens, hidden), dtype), ((tokens, hidden), dtype), ((experts, hidden), dtype),
                             ((experts, 2 * intermediate, hidden), dtype), ((experts, hidden, intermediate), dtype))
    return harness.compute_limit(flops(case), outputs, settings, expert_gemms_ms=_expert_gemms_ms(case))


def _expert_gemms_ms(case: dict) -> float:
    """Per expert, the GEMMs of a forward + backward (gate and up fused: six), rows split evenly,
    into pre-faulted outputs: what remains when nothing else costs."""
    dtype = getattr(torch, case['dtype'])
    rows = case['tokens'] * case['top_k'] // case['experts']
    hidden, intermediate = case['hidden'], case['intermediate']
    x, dy = torch.randn(rows, hidden, dtype=dtype), torch.randn(rows, hidden, dtype=dtype)
    gate_up, down = torch.randn(2 * intermediate, hidden, dtype=dtype), torch.randn(hidden, intermediate, dtype=dtype)
    gu, h = torch.empty(rows, 2 * intermediate, dtype=dtype), torch.randn(rows, intermediate, dtype=dtype)
    y, dx = torch.empty(rows, hidden, dtype=dtype), torch.empty(rows, hidden, dtype=dtype)
    d_gate_up, d_down = torch.empty_like(gate_up), torch.empty_like(down)

    def gemms():
        for _ in range(case['experts']):
            torch.mm(x, gate_up.t(), out=gu)
            torch.mm(h, down.t(), out=y)
            torch.mm(dy, down, out=h)
            torch.mm(dy.t(), h, out=d_down)
            torch.mm(gu.t(), x, out=d_gate_up)
            torch.mm(gu, gate_up, out=dx)
    return harness.median_ms(gemms, reps=3)


def bench_op(args, run_info: dict) -> dict:
    """The runner's per-op step (run.py calls it instead of its registry-driven one).

    Every variant runs ``ROUNDS`` times in fresh processes, the order reversed each round, and
    keeps its fastest round: on a shared machine a burst of load then hits every variant alike
    instead of deciding a ratio by when each happened to run."""
    import report
    settings = harness.SETTINGS[args.size]
    wanted = args.variants or set(VARIANTS)
    measured_cases, skipped_variants = [], {}
    for case in cases(args.size):
        why_skipped = {v: 'not asked for (--variants)' for v in VARIANTS if v not in wanted}
        why_skipped.update(skipped(case))
        for variant, why in why_skipped.items():  # the op's list: each case's reason, once
            earlier = skipped_variants.get(variant)
            skipped_variants[variant] = why if earlier in (None, why) else f'{earlier}; {why}'
        measured = {'label': label(case), 'case': case, 'limit': limit(case, settings), 'variants': {},
                    'skipped': why_skipped}
        chosen = [v for v in VARIANTS if v not in why_skipped]
        rounds = {v: [] for v in chosen}
        for round_index in range(ROUNDS):
            for variant in chosen if round_index % 2 == 0 else chosen[::-1]:
                result = run_fresh(case, variant, settings)
                rounds[variant].append(result)
                print(f'{OP} {measured["label"]} {variant} (round {round_index + 1}): {report.one_line(result)}',
                      flush=True)
        measured['variants'] = {v: _fastest(results) for v, results in rounds.items()}
        measured['limit'] = _steadier_limit(measured['limit'], limit(case, settings))
        print(summary(measured), flush=True)
        measured_cases.append(measured)
    return {'run': run_info, 'skipped': skipped_variants, 'cases': measured_cases, 'baselines': list(BASELINES)}


def _steadier_limit(before: dict, after: dict) -> dict:
    """The limit probed before and again after the variants, keeping the faster GEMM rate and the
    faster experts' GEMMs: on a shared machine one probe can land in a busy moment, and the
    variants keep their fastest round too."""
    steadier = dict(max(before, after, key=lambda probe: probe['gemm_gflop_s']))
    steadier['expert_gemms_ms'] = min(before['expert_gemms_ms'], after['expert_gemms_ms'])
    return steadier


def _fastest(results: list) -> dict:
    finished = [r for r in results if 'error' not in r]
    if not finished:
        return results[0]
    return dict(min(finished, key=lambda r: r['fwd_bwd_ms']), rounds=len(results))


def run_fresh(case: dict, variant: str, settings: harness.Settings) -> dict:
    """``measure`` in a fresh process, as harness.run_variant does for registry backends."""
    from twinkle.backends.cpu import applied_tuning
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET' and k not in applied_tuning()}
    spec = json.dumps({'case': case, 'variant': variant, 'settings': dataclasses.asdict(settings)})
    done = subprocess.run([sys.executable, __file__, '--measure', spec], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return {'error': lines[-1] if lines else f'exit code {done.returncode}'}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(case: dict, variant: str, settings: harness.Settings) -> dict:
    """The harness's measurement (warm-up, peak memory, timed reps) of one variant, this process."""
    harness.make_variant = lambda op, name: make_variant(name)  # these variants are not registry backends
    return harness.measure_variant(OP, case, variant, settings)


def summary(measured: dict) -> str:
    """Per variant: time, GFLOP/s and its share of the GEMM rate, peak memory, and ratios to HF grouped_mm."""
    limit, base = measured['limit'], measured['variants'].get('hf_grouped_mm', {})
    gemm_rate = limit['gemm_gflop_s']
    lines = [f'{measured["label"]}: {limit["flops"] / 1e9:.0f} GFLOP; fp32 GEMM rate {gemm_rate:.0f} GFLOP/s '
             f'(limit {limit["limit_ms"]:.0f} ms); the experts\' GEMMs alone {limit["expert_gemms_ms"]:.0f} ms',
             f'{"variant":<15}{"fwd+bwd ms":>11}{"GFLOP/s":>9}{"% GEMM":>8}{"peak MiB":>10}{"above set-up":>14}'
             f'{"time ÷ HF gmm":>15}{"mem ÷ HF gmm":>14}']
    for variant, result in measured['variants'].items():
        if 'error' in result:
            lines.append(f'{variant:<15} failed: {result["error"]}')
            continue
        rate = limit['flops'] / result['fwd_bwd_ms'] / 1e6
        lines.append(f'{variant:<15}{result["fwd_bwd_ms"]:>11.0f}{rate:>9.0f}{100 * rate / gemm_rate:>7.0f}%'
                     f'{result["peak_mib"]:>10.0f}{result["peak_above_setup_mib"]:>14.0f}'
                     f'{_ratio(result, base, "fwd_bwd_ms"):>15}{_ratio(result, base, "peak_above_setup_mib"):>14}')
    lines += [f'{variant:<15} skipped: {why}' for variant, why in measured['skipped'].items()]
    return '\n'.join(lines)


def _ratio(result: dict, base: dict, key: str) -> str:
    return f'{result[key] / base[key]:.2f}' if base.get(key) else '-'


def main(argv: Optional[list] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ['--measure']:
        spec = json.loads(argv[1])
        print(json.dumps(measure(spec['case'], spec['variant'], harness.Settings(**spec['settings']))))
        return
    import run
    run.main(['--ops', OP, *argv])


if __name__ == '__main__':
    main()
