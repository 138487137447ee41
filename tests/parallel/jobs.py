"""The training jobs the distributed tests launch under torchrun, and their single-process twin.

    python -m torch.distributed.run --standalone --nproc_per_node=N -m tests.parallel.jobs JOB OUT_DIR

Each rank writes ``OUT_DIR/rank<r>.json``. One training loop serves every world size: each rank
reads its data slice (twinkle DataLoader over ``mesh.data_rank``), sums the loss over its tokens,
and gradients are divided by the token count summed over ranks, so the losses equal the
single-process run on the whole global batch.
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

import twinkle
from twinkle import DeviceMesh
from twinkle.dataloader import DataLoader
from twinkle.parallel import (all_reduce_sum, clip_grad_norm_, collective, load_sharded, parallelize, rng_state,
                              save_full_state_dict, save_sharded, scale_gradients_, set_rng_state)

REPO = Path(__file__).resolve().parents[2]
VOCAB, SEQ, GLOBAL_BATCH, STEPS = 512, 16, 4, 5
MAX_NORM = 0.5  # below the tiny model's gradient norms, so clipping acts on every step
STALL_TIMEOUT = 6.0  # also bounds start-up skew between ranks: not too tight on a busy host
LORA_TARGETS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']


def build_model(lora: bool = False, seed: int = 0, **config) -> torch.nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM  # here: the stall job starts faster without it
    torch.manual_seed(seed)
    sizes = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=True)
    model = Qwen3ForCausalLM(Qwen3Config(**{**sizes, **config}))
    if lora:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS))
    return model


def rows(steps: int = STEPS) -> List[Dict[str, torch.Tensor]]:
    """Random tokens; a random-length prompt per row is not trained on, so ranks hold unequal token counts."""
    generator = torch.Generator().manual_seed(1234)
    samples = []
    for index in range(steps * GLOBAL_BATCH):
        input_ids = torch.randint(0, VOCAB, (SEQ,), generator=generator)
        labels = input_ids.clone()
        labels[:int(torch.randint(0, SEQ - 2, (1,), generator=generator))] = -100
        samples.append({'index': index, 'input_ids': input_ids, 'labels': labels})
    return samples


def probe_input() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(7))


class Trainer:
    """Model, AdamW with warm-up, data: what a resumed run must restore exactly."""

    def __init__(self, mesh: DeviceMesh, lora: bool = False, seed: int = 0, mixed_precision=None, **config):
        self.model = parallelize(build_model(lora, seed, **config), mesh, mixed_precision=mixed_precision)
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=1e-3, weight_decay=0.01)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: min(1.0, (step + 1) / 3))
        self.loader = DataLoader(rows(), batch_size=GLOBAL_BATCH, device_mesh=mesh, shuffle=False)
        self.batches = iter(self.loader)

    def step(self) -> Dict[str, float]:
        batch = next(self.batches)
        input_ids = torch.stack([row['input_ids'] for row in batch])
        labels = torch.stack([row['labels'] for row in batch])[:, 1:]
        logits = self.model(input_ids=input_ids).logits[:, :-1].float()
        loss_sum = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100, reduction='sum')
        tokens = all_reduce_sum((labels != -100).sum())
        with collective('backward'):
            loss_sum.backward()
        scale_gradients_(self.parameters, tokens)
        norm = clip_grad_norm_(self.parameters, MAX_NORM)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        return {'loss': (all_reduce_sum(loss_sum.detach()) / tokens).item(), 'grad_norm': norm.item(),
                'rows': [row['index'] for row in batch]}

    def run(self, steps: int) -> Dict[str, list]:
        history = [self.step() for _ in range(steps)]
        return {key: [record[key] for record in history] for key in ('loss', 'grad_norm', 'rows')}

    def probe_logits(self) -> torch.Tensor:
        self.model.eval()
        with torch.no_grad():
            logits = self.model(input_ids=probe_input()).logits
        self.model.train()
        return logits

    def extra_state(self) -> dict:
        return {'scheduler': self.scheduler.state_dict(), 'dataloader': self.loader.state_dict(), 'rng': rng_state()}

    def restore(self, extra_state: dict) -> None:
        self.scheduler.load_state_dict(extra_state['scheduler'])
        self.loader.load_state_dict(extra_state['dataloader'])
        self.batches = iter(self.loader)
        set_rng_state(extra_state['rng'])


def local_parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters this rank stores (its shards under FSDP)."""
    return sum(getattr(p, 'to_local', lambda p=p: p)().nbytes for p in model.parameters())


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the whole model's parameters (a DTensor's numel is its global size)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


# -- jobs (run on every rank) ------------------------------------------------------------------
def job_fsdp(out: Path) -> dict:
    """2 ranks, fsdp=2: full and LoRA trajectories, full checkpoints, sharded save and exact resume."""
    mesh = DeviceMesh.from_sizes(fsdp_size=2)
    twinkle.initialize(global_device_mesh=mesh, seed=0, timeout=60)
    result = {'placement': twinkle.get_device_placement()}
    for lora in (False, True):
        name = 'lora' if lora else 'full'
        trainer = Trainer(mesh, lora=lora)
        result[name] = trainer.run(STEPS)
        save_full_state_dict(trainer.model, str(out / f'{name}_checkpoint'))
        _save_on_rank0(trainer.probe_logits(), out / f'{name}_logits.pt')
        result[f'{name}_param_bytes'] = local_parameter_bytes(trainer.model)
    trainer = Trainer(mesh, mixed_precision='bf16')
    result['bf16'] = trainer.run(2)
    result['bf16_dtypes'] = {'stored': str(next(trainer.model.parameters()).dtype),
                             'logits': str(trainer.probe_logits().dtype)}
    # Resume: dropout makes the RNG state matter; a fresh model from another seed must be overwritten.
    trainer = Trainer(mesh, attention_dropout=0.2)
    trainer.run(3)
    save_sharded(str(out / 'sharded'), trainer.model, trainer.optimizer, trainer.extra_state())
    _save_on_rank0(trainer.probe_logits(), out / 'sharded_logits.pt')
    result['uninterrupted'] = trainer.run(2)
    resumed = Trainer(mesh, seed=99, attention_dropout=0.2)
    resumed.restore(load_sharded(str(out / 'sharded'), resumed.model, resumed.optimizer))
    result['resumed'] = resumed.run(2)
    return result


def job_hsdp(out: Path) -> dict:
    """4 ranks, dp=2 x fsdp=2: full and LoRA trajectories."""
    mesh = DeviceMesh.from_sizes(dp_size=2, fsdp_size=2)
    twinkle.initialize(global_device_mesh=mesh, seed=0, timeout=60)
    return {'placement': twinkle.get_device_placement(), 'data_rank': mesh.data_rank,
            'full': Trainer(mesh).run(STEPS), 'lora': Trainer(mesh, lora=True).run(STEPS)}


def job_data_group(out: Path) -> dict:
    """4 ranks, dp=2 x tp=2: which ranks each reduction reaches (each rank adds 10 ** rank)."""
    mesh = DeviceMesh.from_sizes(dp_size=2, tp_size=2)
    twinkle.initialize(global_device_mesh=mesh, seed=0, timeout=60)
    mine = 10 ** mesh.rank
    return {'data_rank': mesh.data_rank, 'data_sum': int(all_reduce_sum(mine, group=mesh.data_group())),
            'world_sum': int(all_reduce_sum(mine))}


def job_stall(out: Path) -> dict:
    """Rank 1 stops answering; rank 0's next collective must fail, naming itself and rank 1."""
    twinkle.initialize(global_device_mesh=DeviceMesh.from_sizes(fsdp_size=2), timeout=STALL_TIMEOUT)
    if torch.distributed.get_rank() == 1:
        time.sleep(STALL_TIMEOUT + 4)
        return {}
    started = time.perf_counter()
    try:
        all_reduce_sum(1)
    except twinkle.parallel.CollectiveTimeout as error:
        return {'error': str(error), 'seconds': time.perf_counter() - started}
    return {'error': None}


def job_measure(out: Path, **config) -> dict:
    """Median step time, peak memory and parameter bytes per rank, FSDP over all ranks."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    mesh = DeviceMesh.from_sizes(fsdp_size=world_size)
    device = twinkle.initialize(global_device_mesh=mesh, seed=0)
    trainer = Trainer(mesh, **config)
    trainer.loader = DataLoader(rows(40), batch_size=GLOBAL_BATCH, device_mesh=mesh, shuffle=False)
    trainer.batches = iter(trainer.loader)
    trainer.run(3)  # warm-up
    gc.collect()
    ctypes.CDLL('libc.so.6').malloc_trim(0)  # hand the unsharded weights, freed by FSDP, back to the OS
    device.reset_peak_memory()
    seconds = []
    for _ in range(30):
        started = time.perf_counter()
        trainer.step()
        seconds.append(time.perf_counter() - started)
    return {'step_ms': 1e3 * statistics.median(seconds), 'peak_mib': device.peak_memory() / 2**20,
            'param_bytes': local_parameter_bytes(trainer.model), 'unsharded_param_bytes': parameter_bytes(trainer.model)}


def job_measure_wide(out: Path) -> dict:
    """``job_measure`` on a 12.9M-parameter model (51 MB in fp32), where sharding shows in memory."""
    return job_measure(out, hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=4, head_dim=64)


def _save_on_rank0(tensor: torch.Tensor, path: Path) -> None:
    if torch.distributed.get_rank() == 0:
        torch.save(tensor, path)


# -- launching ---------------------------------------------------------------------------------
def launch(job: str, nproc: int, out: Path, timeout: float = 300) -> List[dict]:
    """Run ``job`` under torchrun with ``nproc`` CPU processes; returns each rank's result."""
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
               '-m', 'tests.parallel.jobs', job, str(out)]
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'TWINKLE_LOG_LEVEL': 'WARNING', 'TWINKLE_DEVICE': 'cpu'}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f'{job} on {nproc} ranks failed ({done.returncode}):\n{done.stderr[-4000:]}')
    return [json.loads((out / f'rank{rank}.json').read_text()) for rank in range(nproc)]


def main(job: str, out: str) -> None:
    out_dir = Path(out)
    result = globals()[f'job_{job}'](out_dir)
    rank = int(os.environ.get('RANK', '0'))
    (out_dir / f'rank{rank}.json').write_text(json.dumps(result))


if __name__ == '__main__':
    from tests.torchrun_job import run
    run(main, *sys.argv[1:])
