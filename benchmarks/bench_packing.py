"""Training throughput with packing vs padded batching on a length-skewed dataset.

The same samples are trained on twice with a tiny Qwen3 (TransformersModel, kernels='auto'):
padded batches of ``batch`` samples, and rows bin-packed to ``max_length`` tokens fed padding-free
(attention stays within each sample). The figure is non-pad tokens per second of the training
step; the ratio packed / padded is what packing buys. Lengths are log-normal (most samples short, a
few long), the shape of real chat data that makes padding expensive.

    python benchmarks/bench_packing.py [--quick]
"""
from __future__ import annotations

import datetime
import os
import statistics
import time
from typing import Dict, List

import torch

from harness import whole_job_main


def skewed_samples(count: int, max_length: int, vocab: int, seed: int = 0) -> List[Dict]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.distributions.LogNormal(4.0, 0.9).sample((count,)).clamp(8, max_length).long().tolist()
    rows = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=generator).tolist()
        rows.append({'input_ids': ids, 'labels': ids, 'attention_mask': [1] * n, 'position_ids': list(range(n)),
                     'length': n})
    return rows


def throughput(model, batches: List, steps: int) -> float:
    """Median non-pad tokens/s over ``steps`` training steps (after one warm-up step)."""
    model.forward_backward(inputs=batches[0])
    model.clip_grad_and_step()
    rates = []
    for batch in (batches * steps)[1:steps + 1]:
        tokens = sum(row['length'] for row in batch)
        started = time.perf_counter()
        model.forward_backward(inputs=batch)
        model.clip_grad_and_step()
        rates.append(tokens / (time.perf_counter() - started))
    return statistics.median(rates)


def measure(quick: bool) -> dict:
    from transformers import Qwen3Config

    import twinkle
    from twinkle.dataset import pack_rows
    from twinkle.model import TransformersModel
    from twinkle.processor import InputProcessor

    import run as runner

    twinkle.initialize(seed=0)
    vocab, max_length, batch = 4096, 512, 8
    count, steps = (64, 4) if quick else (256, 12)
    config = dict(vocab_size=vocab, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=max_length)
    samples = skewed_samples(count, max_length, vocab)
    padded = [samples[i:i + batch] for i in range(0, len(samples), batch)]
    packed_rows = pack_rows(samples, max_length)
    packed = [packed_rows[i:i + batch // 4 or 1] for i in range(0, len(packed_rows), batch // 4 or 1)]
    results = {}
    for name, batches, processor in (('padded', padded, InputProcessor()),
                                     ('packed', packed, InputProcessor(padding_free=True))):
        torch.manual_seed(0)
        model = TransformersModel(config=Qwen3Config(**config))
        model.set_processor(processor)
        model.set_optimizer('AdamW', lr=1e-4)
        results[name] = throughput(model, batches, steps)
    real = sum(r['length'] for r in samples)
    padded_slots = sum(len(b) * max(r['length'] for r in b) for b in padded)
    return {
        'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
        'machine': runner.machine_facts(twinkle.backends.current())['id'],
        'load_average': round(os.getloadavg()[0], 2), 'samples': count, 'tokens': real, 'max_length': max_length, 'batch': batch, 'steps': steps,
        'padded_fill': real / padded_slots, 'packed_rows': len(packed_rows),
        'tokens_per_second': results, 'speedup': results['packed'] / results['padded'],
        'torch': torch.__version__, 'threads': torch.get_num_threads(),
    }


def main(argv=None) -> dict:
    result = whole_job_main('packing', __doc__.splitlines()[0], measure, argv)
    rates = result['tokens_per_second']
    print(f"packing: padded {rates['padded']:.0f} tok/s (fill {result['padded_fill']:.0%}), "
          f"packed {rates['packed']:.0f} tok/s -> {result['speedup']:.2f}x", flush=True)
    return result


if __name__ == '__main__':
    main()
