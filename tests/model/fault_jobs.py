"""TransformersModel jobs that die or diverge at named points, for the fault tests (test_faults.py).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/model/fault_jobs.py JOB OUT [ARG]

A process is killed with SIGKILL from inside the library call at the named point (a wrapped
function calls ``os.kill(os.getpid(), SIGKILL)``), so the kill lands at the same instant every run:
no sleeps, no races. Each surviving rank writes what it saw to ``OUT/<job>.rank<r>.json``.
"""
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

import twinkle  # noqa: E402
from twinkle import DeviceMesh  # noqa: E402
from twinkle.dataloader import DataLoader  # noqa: E402
from twinkle.model import TransformersModel  # noqa: E402
from twinkle.parallel import CollectiveTimeout, all_reduce_sum  # noqa: E402
from tests.model.conftest import token_batch  # noqa: E402

CHECKPOINT = 'ck'
TIMEOUT = 60  # explicit for the checkpoint jobs: they test saving, not the default timeout


def rank() -> int:
    return int(os.environ.get('RANK', 0))


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def lora_model() -> TransformersModel:
    from peft import LoraConfig
    from transformers import Qwen3Config
    config = Qwen3Config(vocab_size=1024, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    model = TransformersModel(config=config)
    model.add_adapter_to_model('default', LoraConfig(r=4, lora_alpha=8, target_modules='all-linear'))
    model.set_optimizer('AdamW', lr=1e-2)
    return model


def train_step(model: TransformersModel, seed: int) -> None:
    model.forward_backward(inputs=token_batch(size=4, seed=seed)[rank() * 2:rank() * 2 + 2])
    model.clip_grad_and_step()


def kill_rank0_at(point: str) -> None:
    """Arm SIGKILL of rank 0 at ``point`` of the next save."""
    if rank() != 0:
        return
    if point == 'between_parts':  # the full weights are written, the sharded resume state is not
        from twinkle.model.transformers import model as model_module
        model_module.write_sharded = lambda *args, **kwargs: die()
    elif point == 'between_renames':  # the two-rename commit (no RENAME_EXCHANGE): old retired, new not in
        from twinkle.utils import io
        io._exchange = lambda first, second: False
        replace = os.replace

        def replace_then_die(source, target):
            replace(source, target)
            if os.path.basename(str(target)).startswith(CHECKPOINT + io.RETIRED):
                die()
        os.replace = replace_then_die
    else:
        raise ValueError(point)


def job_save_killed(out: str, point: str) -> dict:
    """Save a resumable checkpoint, train on, then save again and die at ``point`` on rank 0."""
    twinkle.initialize(global_device_mesh=DeviceMesh.from_sizes(fsdp_size=2), seed=0, timeout=TIMEOUT)
    model = lora_model()
    train_step(model, seed=0)
    model.save(CHECKPOINT, output_dir=out, save_optimizer=True)
    train_step(model, seed=1)
    kill_rank0_at(point)
    try:
        model.save(CHECKPOINT, output_dir=out, save_optimizer=True)
    except CollectiveTimeout as error:  # rank 1: its peer died inside the save
        return {'error': str(error)}
    return {'error': None}


def job_resume(out: str) -> dict:
    """Resume what ``job_save_killed`` left, train a step and save again (which cleans leftovers)."""
    twinkle.initialize(global_device_mesh=DeviceMesh.from_sizes(fsdp_size=2), seed=0, timeout=TIMEOUT)
    model = lora_model()
    model.resume_from_checkpoint(os.path.join(out, CHECKPOINT))
    steps = model._state(None).optimizer_steps
    train_step(model, seed=1)
    model.save(CHECKPOINT, output_dir=out, save_optimizer=True)
    return {'resumed_optimizer_steps': steps, 'listing': sorted(os.listdir(out))}


def job_default_timeout(out: str) -> dict:
    """initialize() without a timeout: the process group's timeout is twinkle's stated default."""
    from torch.distributed.distributed_c10d import _get_default_group
    twinkle.initialize(global_device_mesh=DeviceMesh.from_sizes(fsdp_size=2))
    gloo = _get_default_group()._get_backend(torch.device('cpu'))  # what torch really waits
    return {'timeout_s': gloo.options._timeout.total_seconds(),
            'twinkle_timeout_s': twinkle.runtime.process_group_timeout().total_seconds()}


def job_peer_killed(out: str) -> dict:
    """Default timeout; rank 1 is SIGKILLed at a step boundary (entering its second step): rank 0's
    next collective must fail fast with a CollectiveTimeout naming rank 1."""
    twinkle.initialize(global_device_mesh=DeviceMesh.from_sizes(fsdp_size=2), seed=0)
    model = lora_model()
    train_step(model, seed=0)
    if rank() == 1:
        die()
    started = time.perf_counter()
    try:
        train_step(model, seed=1)
    except CollectiveTimeout as error:
        return {'error': str(error), 'seconds': time.perf_counter() - started}
    return {'error': None}


def job_uneven_data(out: str) -> dict:
    """Rank 1's dataset is twice rank 0's, so it would run twice the steps: the loader must stop
    every rank with an error at the start of the epoch, not let the collectives mismatch."""
    twinkle.initialize(global_device_mesh=DeviceMesh.from_sizes(fsdp_size=2), timeout=TIMEOUT)
    rows = list(range(8 if rank() == 0 else 16))
    steps = 0
    try:
        for _ in DataLoader(rows, batch_size=4, shuffle=False):
            all_reduce_sum(1)  # a training step's collective
            steps += 1
    except ValueError as error:
        return {'error': str(error), 'steps': steps}
    return {'error': None, 'steps': steps}


def job_moved(out: str, phase: str) -> dict:
    """Phase 'save': step, save a resumable checkpoint, two more steps. Phase 'resume': resume it and
    take the same two steps. Run with different world sizes, the losses must agree."""
    world = int(os.environ.get('WORLD_SIZE', 1))
    twinkle.initialize(global_device_mesh=DeviceMesh.from_sizes(fsdp_size=world), seed=0, timeout=TIMEOUT)
    model = lora_model()
    share = 4 // world

    def step(seed):
        model.forward_backward(inputs=token_batch(size=4, seed=seed)[rank() * share:(rank() + 1) * share])
        model.clip_grad_and_step()
        return model.calculate_metric()['loss']
    if phase == 'save':
        step(0)
        model.save(CHECKPOINT, output_dir=out, save_optimizer=True)
    else:
        try:
            model.resume_from_checkpoint(os.path.join(out, CHECKPOINT))
        except ValueError as error:
            return {'error': str(error)}
    return {'losses': [step(1), step(2)], 'world': world}


if __name__ == '__main__':
    job, out_dir, *args = sys.argv[1:]
    result = globals()[f'job_{job}'](out_dir, *args)
    with open(os.path.join(out_dir, f'{job}.rank{rank()}.json'), 'w') as handle:
        json.dump(result, handle)
