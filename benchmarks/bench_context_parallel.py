"""Context parallelism on CPU (gloo): peak memory per rank of a 4k-token training step, and the bytes
ring attention and Ulysses exchange, against one process and the minimum.

    python benchmarks/bench_context_parallel.py [--quick]

Each layout runs in fresh processes (2 or 4 ranks under torchrun, gloo, fp32, one thread each):
TransformersModel with AdamW, FSDP2 over the sequence ranks, one 4096-token sequence per step. Two
models: the embedded tiny Qwen3 (what ``examples/long_context.py`` trains: hidden 64, vocab 151936,
so its step is dominated by what does not grow with tokens: the LM head's chunk buffer and the
embedding's gradient) and a wider random Qwen3 with a small vocab, whose step is dominated by the
activations context parallelism shards. After one warm-up step (the optimizer state exists), freed
heap goes back to the OS, VmHWM is reset (``/proc/self/clear_refs``) and the next step's high-water
mark is read: the activation peak is that minus the resident set before the step, per rank, and
its ratio to one process's. Apart, the bytes autograd saves for backward in one more step (the
activations proper, parameters left out) show what the sharding itself removes; the peak also
holds transients (FSDP2's gathered weights and unsharded gradients, the LM head's chunk buffer).
``fsdp=2`` (two data ranks, each with its own 4096-token sequence: one process's tokens per rank) is
what FSDP2 itself costs; a cp=2 rank pays it too, so cp=2 ÷ fsdp=2 is the context-parallel saving.

Bytes: one more forward + backward with ``dist.all_to_all_single`` and ``dist.batch_isend_irecv``
wrapped (here only) to count what each rank sends to other ranks (an all-to-all's own slice
stays). The minimum per rank, for L attention layers, c = cp, u = ulysses ranks, T = padded tokens
per row (rows R, head dim D, H query heads, K kv heads after Ulysses' replication, e bytes):
- Ulysses: q, k, v there and the output back, forward and their gradients in backward, each sending
  (u - 1) / u of the tensor: ``2 L R (T / (c u)) D e (2H + 2K) (u - 1) / u``.
- Ring: each rank receives every other cp rank's K/V once in forward, once again in backward, and
  sends their gradients home once: ``3 L (c - 1) 2 R (T / c) (K / u) D e``.
Writes ``results/training/context_parallel[-quick].json``, its plot and the section in RESULTS.md.
"""
from __future__ import annotations

import ctypes
import datetime
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
LAYOUTS = {'one process': (1, 1, 1), 'fsdp=2': (2, 1, 1), 'cp=2': (2, 2, 1), 'ulysses=2': (2, 1, 2), 'cp=2 x ulysses=2': (4, 2, 2)}
WIDE = dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, head_dim=64, tie_word_embeddings=True, max_position_embeddings=4096)
MODELS = {'default': {'tiny': None, 'wide': WIDE},
          'quick': {'tiny': None, 'wide': dict(WIDE, hidden_size=128, intermediate_size=352, num_hidden_layers=2)}}
LENGTH = {'default': 4096, 'quick': 1024}
TIMEOUT_S = 1800


def _status_bytes(key: str) -> int:
    with open('/proc/self/status') as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(key))


def _reset_high_water_mark() -> int:
    """Freed heap back to the OS, VmHWM reset to the resident set; returns that baseline."""
    gc.collect()
    ctypes.CDLL('libc.so.6').malloc_trim(0)
    with open('/proc/self/clear_refs', 'w') as refs:
        refs.write('5')
    return _status_bytes('VmRSS')


class SentBytes:
    """Bytes this rank hands to other ranks through all-to-all (Ulysses) and send (ring), while on."""

    def __init__(self):
        import torch.distributed as dist
        self.dist, self.ulysses, self.ring = dist, 0, 0
        self._all_to_all, self._batch = dist.all_to_all_single, dist.batch_isend_irecv

    def __enter__(self):
        dist = self.dist

        def all_to_all_single(output, input, *args, group=None, **kwargs):
            if args or kwargs.get('input_split_sizes') or kwargs.get('output_split_sizes'):
                raise NotImplementedError('counting assumes even all-to-all splits')
            ranks = dist.get_world_size(group)
            self.ulysses += input.numel() * input.element_size() * (ranks - 1) // ranks
            return self._all_to_all(output, input, group=group, **kwargs)

        def batch_isend_irecv(ops):
            self.ring += sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend)
            return self._batch(ops)

        dist.all_to_all_single, dist.batch_isend_irecv = all_to_all_single, batch_isend_irecv
        return self

    def __exit__(self, *exc):
        self.dist.all_to_all_single, self.dist.batch_isend_irecv = self._all_to_all, self._batch


class SavedActivations(torch.autograd.graph.saved_tensors_hooks):
    """Bytes of the tensors autograd saves for backward, each storage once, parameters left out:
    the activations a rank holds at the end of forward, apart from any transient buffer."""

    def __init__(self):
        self.total, self._seen = 0, set()
        super().__init__(self._pack, lambda saved: saved)

    def __enter__(self):
        super().__enter__()
        return self

    def _pack(self, tensor):
        if not (tensor.is_leaf and tensor.requires_grad) and not tensor.is_meta:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in self._seen:
                self._seen.add(storage.data_ptr())
                self.total += storage.nbytes()
        return tensor


def minimum_bytes(config, length: int, cp: int, ulysses: int) -> dict:
    """The docstring's formulas, per rank, for the one row (R = 1) of ``length`` tokens, fp32."""
    from twinkle.parallel.context_parallel import ulysses_kv_replicas
    layers, heads, dim = config.num_hidden_layers, config.num_attention_heads, config.head_dim
    kv = config.num_key_value_heads * ulysses_kv_replicas(heads, config.num_key_value_heads, ulysses)
    padded = -(-length // (2 * cp * ulysses)) * 2 * cp * ulysses
    e = 4
    return {'ulysses': 2 * layers * (padded // (cp * ulysses)) * dim * e * (2 * heads + 2 * kv) * (ulysses - 1) // ulysses,
            'ring': 3 * layers * (cp - 1) * 2 * (padded // cp) * (kv // ulysses) * dim * e}


def measure(model: str, length: int, cp: int, ulysses: int, out: str) -> None:
    """One rank: warm-up step, the measured step, one counted forward + backward."""
    import torch.distributed as dist

    import twinkle
    from twinkle import DeviceMesh, assets
    from twinkle.model import TransformersModel
    world = int(os.environ.get('WORLD_SIZE', '1'))
    mesh = DeviceMesh.from_sizes(world_size=world, cp_size=cp, ulysses_size=ulysses, fsdp_size=world // (cp * ulysses))
    twinkle.initialize(seed=0, global_device_mesh=mesh, timeout=600)
    if model == 'tiny':
        transformers_model = TransformersModel(model_id=assets.tiny_model_path('qwen3'), mixed_precision='fp32')
    else:
        from transformers import Qwen3Config
        transformers_model = TransformersModel(config=Qwen3Config(**json.loads(model)), mixed_precision='fp32')
    transformers_model.set_optimizer('AdamW', lr=1e-4)
    config = transformers_model.model.config
    ids = torch.randint(0, config.vocab_size, (length,), generator=torch.Generator().manual_seed(0)).tolist()
    inputs = [{'input_ids': ids, 'labels': ids}]

    def step():
        transformers_model.forward_backward(inputs=inputs)
        return transformers_model.clip_grad_and_step()

    step()
    baseline = _reset_high_water_mark()
    started = time.perf_counter()
    transformers_model.forward_backward(inputs=inputs)
    forward_backward_peak = _status_bytes('VmHWM') - baseline
    transformers_model.clip_grad_and_step()
    wall_s = time.perf_counter() - started
    step_peak = _status_bytes('VmHWM') - baseline
    with SentBytes() as sent, SavedActivations() as saved:
        transformers_model.forward_backward(inputs=inputs)
    transformers_model.clip_grad_and_step()
    rank = dist.get_rank() if dist.is_initialized() else 0
    result = {'baseline_bytes': baseline, 'step_peak_bytes': step_peak,
              'forward_backward_peak_bytes': forward_backward_peak, 'wall_s': wall_s,
              'saved_activation_bytes': saved.total, 'sent_bytes': {'ulysses': sent.ulysses, 'ring': sent.ring},
              'minimum_bytes': minimum_bytes(config, length, cp, ulysses)}
    Path(out, f'rank{rank}.json').write_text(json.dumps(result))


def run_layout(model: str, length: int, layout: tuple, out: Path) -> list:
    nproc, cp, ulysses = layout
    out.mkdir(parents=True, exist_ok=True)
    launcher = [sys.executable] if nproc == 1 else [sys.executable, '-m', 'torch.distributed.run', '--standalone',
                                                     f'--nproc_per_node={nproc}']
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1', 'TWINKLE_DEVICE': 'cpu',
           'CUDA_VISIBLE_DEVICES': '', 'OMP_NUM_THREADS': '1', 'TWINKLE_LOG_LEVEL': 'WARNING'}
    subprocess.run([*launcher, __file__, '--measure', model, str(length), str(cp), str(ulysses), str(out)],
                   check=True, env=env, cwd=ROOT, timeout=TIMEOUT_S)
    return [json.loads((out / f'rank{rank}.json').read_text()) for rank in range(nproc)]


def measure_all(quick: bool) -> dict:
    size = 'quick' if quick else 'default'
    length, models = LENGTH[size], {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, config in MODELS[size].items():
            spec = 'tiny' if config is None else json.dumps(config)
            layouts = {}
            for label, layout in LAYOUTS.items():
                ranks = run_layout(spec, length, layout, Path(scratch, name, label.replace(' ', '_')))
                layouts[label] = {'nproc': layout[0], 'cp': layout[1], 'ulysses': layout[2], 'ranks': ranks}
                print(f'{name} {label}: activation peak per rank '
                      + ', '.join(f'{r["step_peak_bytes"] / 2**20:.0f}' for r in ranks) + ' MiB', flush=True)
            one = layouts['one process']['ranks'][0]['step_peak_bytes']
            one_saved = layouts['one process']['ranks'][0]['saved_activation_bytes']
            for figures in layouts.values():
                for rank in figures['ranks']:
                    rank['step_peak_ratio'] = rank['step_peak_bytes'] / one
                    rank['saved_ratio'] = rank['saved_activation_bytes'] / one_saved
                    sent, minimum = rank['sent_bytes'], rank['minimum_bytes']
                    rank['bytes_ratio'] = {kind: sent[kind] / minimum[kind] for kind in sent if minimum[kind]}
            models[name] = {'config': config or 'embedded tiny Qwen3', 'layouts': layouts}
    return {'date': datetime.datetime.now().strftime('%Y-%m-%dT%H:%M'), 'torch': torch.__version__,
            'load_average': round(os.getloadavg()[0], 1), 'tokens': length, 'models': models}


def plot(result: dict, path: Path) -> None:
    """Activation peak per rank over one process's, per model and layout (rank 0; target line 0.6)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(7, 4))
    labels = list(LAYOUTS)
    width = 0.8 / len(result['models'])
    for index, (name, measured) in enumerate(result['models'].items()):
        ratios = [max(r['step_peak_ratio'] for r in measured['layouts'][label]['ranks']) for label in labels]
        axis.bar([x + index * width for x in range(len(labels))], ratios, width, label=f'{name} Qwen3')
    axis.axhline(0.6, color='grey', linestyle='--', linewidth=0.8, label='target 0.6')
    axis.set_xticks([x + width * (len(result['models']) - 1) / 2 for x in range(len(labels))], labels, fontsize=8)
    axis.set_ylabel('activation peak ÷ one process (worst rank)')
    axis.set_title(f'context parallelism, {result["tokens"]} tokens, CPU gloo fp32, {result["date"]}', fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv=None) -> dict:
    from harness import whole_job_main
    result = whole_job_main('context_parallel', __doc__.splitlines()[0], measure_all, argv)
    name = 'context_parallel-quick' if '--quick' in (argv or sys.argv[1:]) else 'context_parallel'
    plot(result, BENCH / 'results' / 'training' / f'{name}.png')
    return result


if __name__ == '__main__':
    if sys.argv[1:2] == ['--measure']:  # one rank, in a fresh process started by ``run_layout``
        model, length, cp, ulysses, out = sys.argv[2:7]
        measure(model, int(length), int(cp), int(ulysses), out)
    else:
        main()
