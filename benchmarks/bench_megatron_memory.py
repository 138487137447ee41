"""Memory per rank of MegatronModel at tp=2 against one process, for a wider tiny Qwen3.

    python benchmarks/bench_megatron_memory.py [--quick] [--out DIR]

A random Qwen3 (hidden 1024, 4 layers, vocab 32000: ~80M parameters) is written as an HF directory;
then, each in a fresh process (one process, then 2 ranks under torchrun at tp=2): load, AdamW, 3
training steps. Each rank reports the parameters it holds, the bytes of parameters + gradients +
AdamW state it holds, and its peak resident memory above the process after its imports (VmHWM,
reset through /proc/self/clear_refs). Results: benchmarks/results/training/megatron_memory.json + RESULTS.md.
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WIDE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
            num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, max_position_embeddings=512)
QUICK = dict(WIDE, hidden_size=256, intermediate_size=704, vocab_size=8000)
STEPS, BATCH, SEQ = 3, 4, 128


def _status_bytes(key: str) -> int:
    with open('/proc/self/status') as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(key))


def measure(model_dir: str, out: str) -> None:
    """One rank: what it holds and its peak above its imports."""
    import torch.distributed as dist

    import twinkle
    from twinkle import DeviceMesh
    from twinkle.model.megatron import MegatronModel
    world = int(os.environ.get('WORLD_SIZE', '1'))
    mesh = DeviceMesh.from_sizes(tp_size=world) if world > 1 else None
    if mesh is not None:
        twinkle.initialize(global_device_mesh=mesh, seed=0, timeout=300)
    with open('/proc/self/clear_refs', 'w') as refs:
        refs.write('5')
    base = _status_bytes('VmRSS')
    model = MegatronModel(model_id=model_dir, device_mesh=mesh)
    model.set_optimizer('AdamW', lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    vocab = model.hf_config.vocab_size
    for _ in range(STEPS):
        rows = [{'input_ids': ids, 'labels': ids} for ids in torch.randint(0, vocab, (BATCH, SEQ), generator=generator).tolist()]
        model.forward_backward(inputs=rows)
        model.clip_grad_and_step()
    parameters = list(model.model.parameters())
    state = model._state(None).optimizer.state
    held = sum(p.numel() * p.element_size() for p in parameters) * 2  # parameters + gradients (fp32)
    held += sum(t.numel() * t.element_size() for s in state.values() for t in s.values() if torch.is_tensor(t))
    rank = dist.get_rank() if dist.is_initialized() else 0
    result = {'parameters': sum(p.numel() for p in parameters), 'held_bytes': held,
              'peak_above_imports_bytes': _status_bytes('VmHWM') - base}
    Path(out, f'rank{rank}.json').write_text(json.dumps(result))
    model.close()


def run(model_dir: str, nproc: int, out: Path) -> list:
    out.mkdir(parents=True, exist_ok=True)
    launcher = [sys.executable] if nproc == 1 else [sys.executable, '-m', 'torch.distributed.run', '--standalone',
                                                     f'--nproc_per_node={nproc}']
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'TWINKLE_DEVICE': 'cpu', 'CUDA_VISIBLE_DEVICES': '',
           'OMP_NUM_THREADS': str(max(1, (os.cpu_count() or 2) // nproc)), 'TWINKLE_LOG_LEVEL': 'WARNING'}
    subprocess.run([*launcher, __file__, '--measure', model_dir, str(out)], check=True, env=env, cwd=ROOT,
                   timeout=1800)
    return [json.loads((out / f'rank{rank}.json').read_text()) for rank in range(nproc)]


def measure_both(quick: bool) -> dict:
    from transformers import Qwen3Config, Qwen3ForCausalLM
    config = QUICK if quick else WIDE
    with tempfile.TemporaryDirectory() as scratch:
        torch.manual_seed(0)
        Qwen3ForCausalLM(Qwen3Config(**config)).save_pretrained(Path(scratch, 'model'))
        one = run(str(Path(scratch, 'model')), 1, Path(scratch, 'one'))[0]
        tp2 = run(str(Path(scratch, 'model')), 2, Path(scratch, 'tp2'))
    return {'date': datetime.datetime.now().strftime('%Y-%m-%dT%H:%M'), 'torch': torch.__version__,
            'load_average': round(os.getloadavg()[0], 1), 'config': config, 'steps': STEPS,
            'batch': [BATCH, SEQ], 'one_process': one, 'tp2': tp2,
            'held_ratio': [rank['held_bytes'] / one['held_bytes'] for rank in tp2],
            'peak_ratio': [rank['peak_above_imports_bytes'] / one['peak_above_imports_bytes'] for rank in tp2]}


if __name__ == '__main__':
    if sys.argv[1:2] == ['--measure']:  # one rank, in a fresh process started by ``run``
        measure(*sys.argv[2:4])
    else:
        from harness import whole_job_main
        whole_job_main('megatron_memory', __doc__.splitlines()[0], measure_both)
