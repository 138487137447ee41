"""The all-to-all token dispatcher on ranks of one EP group, under torchrun (gloo, CPU).

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m tests.parallel.ep_dispatch_job OUT_DIR

Three checks, each rank saving ``OUT_DIR/rank<r>.pt``:
- twinkle's experts (the kernelized tiny Qwen3-MoE) under EP, and the same kernelized model in one
  process (every rank computes that twin on the whole batch);
- Hugging Face's experts (the model not kernelized, ``kernels=None``) under EP: which classes and
  forwards ran, and what the log said;
- the host reads (syncing Tensor calls) of one expert-parallel layer's forward and backward.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from .ep_job import TOP_K, batch, build_model, expert_parameters, force_routing, forward_backward

SYNCING = ('item', 'tolist', '__bool__', '__int__', '__float__', '__index__', 'nonzero', 'cpu', 'numpy')


def kernelized_model(forced: bool) -> torch.nn.Module:
    from twinkle.kernels import kernelize
    model = kernelize(build_model())
    if forced:
        force_routing(model)
    return model


def experts_modules(model: torch.nn.Module):
    return [module.mlp.experts for module in model.model.layers]


def expert_parallel(mesh, forced: bool) -> dict:
    from twinkle.kernels import TwinkleMoeExperts
    from twinkle.parallel import all_reduce_sum, apply_expert_parallel
    model = apply_expert_parallel(kernelized_model(forced), mesh)
    rank, ranks = dist.get_rank(), dist.get_world_size()
    result = forward_backward(model, batch()[rank::ranks])
    experts = expert_parameters(model)
    for name, grad in result['grads'].items():
        if name not in experts:
            result['grads'][name] = all_reduce_sum(grad)
    dispatchers = [module.token_dispatcher for module in experts_modules(model)]
    result.update(first_experts=[d.first_expert for d in dispatchers],
                  local_experts=[d.local_experts for d in dispatchers],
                  expert_grad_names=sorted(experts),
                  twinkle_experts=all(isinstance(module, TwinkleMoeExperts) for module in experts_modules(model)))
    return result


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def twinkle_log():
    """The messages the twinkle logger gets on this rank (its own handler shows rank 0 only)."""
    logger, records = logging.getLogger('twinkle'), _Records()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(records)
    try:
        yield records.messages
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)


def hugging_face_experts_kept(mesh) -> dict:
    """EP on the model as loaded (no kernelize): count the forwards of HF's experts and of twinkle's
    grouped experts during one forward+backward."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    import twinkle.kernels.moe.module as twinkle_experts
    from twinkle.kernels import TwinkleMoeExperts
    from twinkle.parallel import apply_expert_parallel
    with twinkle_log() as messages:
        model = apply_expert_parallel(build_model(), mesh)
    calls = collections.Counter()
    hf_forward, grouped_experts = Qwen3MoeExperts.forward, twinkle_experts.grouped_experts

    def counted_hf_forward(self, *args, **kwargs):
        calls['hf_experts_forward'] += 1
        return hf_forward(self, *args, **kwargs)

    def counted_grouped_experts(*args, **kwargs):
        calls['twinkle_grouped_experts'] += 1
        return grouped_experts(*args, **kwargs)

    Qwen3MoeExperts.forward, twinkle_experts.grouped_experts = counted_hf_forward, counted_grouped_experts
    try:
        forward_backward(model, batch()[dist.get_rank()::dist.get_world_size()])
    finally:
        Qwen3MoeExperts.forward, twinkle_experts.grouped_experts = hf_forward, grouped_experts
    modules = experts_modules(model)
    return {'messages': messages, 'calls': dict(calls),
            'all_hf': all(isinstance(module, Qwen3MoeExperts) for module in modules),
            'any_twinkle': any(isinstance(module, TwinkleMoeExperts) for module in modules),
            'num_experts': [module.num_experts for module in modules]}


@contextlib.contextmanager
def counted_host_reads():
    """Counts the calls of the syncing Tensor methods, by the file and line that made them."""
    calls = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in SYNCING}
    busy = []

    def counting(name, original):
        def counted(tensor, *args, **kwargs):
            if not busy:  # a call made by a counted call is not counted again
                frame = next(f for f in reversed(traceback.extract_stack()[:-1]) if '/torch/' not in f.filename)
                calls[f'{name} at {Path(frame.filename).name}:{frame.lineno}'] += 1
            busy.append(name)
            try:
                return original(tensor, *args, **kwargs)
            finally:
                busy.pop()
        return counted

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(name, original))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def host_reads_of_one_layer(mesh) -> dict:
    """One expert-parallel experts module called by itself, forward then backward. grouped_experts
    runs on ``grouped_mm``, the backend a GPU picks (the CPU loop reads its group bounds from host
    memory, which is no sync on a CPU and never runs on a GPU)."""
    from twinkle import kernels
    from twinkle.parallel import apply_expert_parallel
    kernels.configure(grouped_experts='grouped_mm')
    model = apply_expert_parallel(kernelized_model(False), mesh)
    experts = experts_modules(model)[0]
    generator = torch.Generator().manual_seed(dist.get_rank())
    hidden = torch.randn(10, 64, generator=generator, requires_grad=True)
    top_k_index = torch.rand(10, 4, generator=generator).topk(TOP_K, dim=1).indices
    top_k_weights = torch.rand(10, TOP_K, generator=generator, requires_grad=True)
    with counted_host_reads() as forward_reads:
        out = experts(hidden, top_k_index, top_k_weights)
    with counted_host_reads() as backward_reads:
        out.square().sum().backward()
    kernels.configure()
    return {'forward': dict(forward_reads), 'backward': dict(backward_reads)}


def main(out: str) -> None:
    import twinkle
    from twinkle import DeviceMesh
    mesh = DeviceMesh.from_sizes(ep_size=int(os.environ['WORLD_SIZE']))
    twinkle.initialize(mode='local', global_device_mesh=mesh)
    result = {kind: {'ep': expert_parallel(mesh, forced), 'twin': forward_backward(kernelized_model(forced), batch())}
              for kind, forced in (('random', False), ('forced', True))}
    result['hf'] = hugging_face_experts_kept(mesh)
    result['host_reads'] = host_reads_of_one_layer(mesh)
    torch.save(result, Path(out) / f'rank{dist.get_rank()}.pt')
    dist.barrier()
    dist.destroy_process_group()


if __name__ == '__main__':
    from tests.torchrun_job import run
    run(main, *sys.argv[1:])
