"""Expert parallelism on a tiny Qwen3-MoE under torchrun, and its single-process twin.

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m tests.parallel.ep_job OUT_DIR

EP ranks read different rows of the global batch (rank r: rows r::ranks) and sum the loss over
them; non-expert gradients are then summed over ranks, expert gradients already hold every
rank's tokens (the combine's backward brings them to the owner). Each rank saves
``OUT_DIR/rank<r>.pt``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
VOCAB, SEQ, GLOBAL_BATCH, TOP_K = 256, 8, 4, 2
FORCED_EXPERTS = (0, 1)  # both owned by EP rank 0: rank 1 receives nothing


def build_model(seed: int = 0) -> torch.nn.Module:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, num_experts=4,
                            num_experts_per_tok=TOP_K, max_position_embeddings=64)
    return Qwen3MoeForCausalLM(config)


def batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1234))


def force_routing(model: torch.nn.Module) -> None:
    """Every token picks FORCED_EXPERTS (with the router's own top-k weights)."""
    for module in model.modules():
        if type(module).__name__ == 'Qwen3MoeTopKRouter':
            routed = module.forward

            def forward(hidden_states, routed=routed):
                router_logits, scores, indices = routed(hidden_states)
                return router_logits, scores, torch.tensor(FORCED_EXPERTS).expand_as(indices)

            module.forward = forward


def expert_parameters(model: torch.nn.Module) -> Dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if name.endswith(('gate_up_proj', 'down_proj'))
            and p.dim() == 3}


def forward_backward(model: torch.nn.Module, input_ids: torch.Tensor) -> dict:
    """Logits of ``input_ids``, their summed next-token loss, and every parameter's gradient of the
    loss summed over the global batch divided by its token count."""
    logits = model(input_ids=input_ids).logits
    loss_sum = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), input_ids[:, 1:].reshape(-1), reduction='sum')
    (loss_sum / (GLOBAL_BATCH * (SEQ - 1))).backward()
    return {'logits': logits.detach(), 'loss_sum': loss_sum.detach(),
            'grads': {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}}


def single_process(forced: bool = False) -> dict:
    model = build_model()
    if forced:
        force_routing(model)
    return forward_backward(model, batch())


def run_ep_rank(mesh, forced: bool) -> dict:
    from twinkle.parallel import all_reduce_sum
    from twinkle.parallel.expert_parallel import apply_expert_parallel, count_dispatched_bytes, expert_units
    model = apply_expert_parallel(build_model(), mesh)
    if forced:
        force_routing(model)
    rank, ranks = dist.get_rank(), dist.get_world_size()
    input_ids = batch()[rank::ranks]
    with count_dispatched_bytes(model) as dispatched:
        result = forward_backward(model, input_ids)
    experts = expert_parameters(model)
    for name, grad in result['grads'].items():
        if name not in experts:
            result['grads'][name] = all_reduce_sum(grad)
    slices = [dispatcher for _, _, dispatcher in expert_units(model)]
    result.update(first_experts=[s.first_expert for s in slices], local_experts=[s.local_experts for s in slices],
                  dispatched_bytes=dispatched.total,
                  routed_bytes=len(slices) * input_ids.numel() * TOP_K * 64 * 4,
                  expert_grad_names=sorted(experts))
    return result


def check_uneven_exchange(group=None) -> dict:
    """all_to_all_dispatch/combine by themselves: rank r sends r + 1 rows to rank 0 and none to
    the others, so every rank but 0 receives nothing; the gradient must come back to the sender."""
    from twinkle.parallel.expert_parallel import all_to_all_combine, all_to_all_dispatch
    rank, ranks = dist.get_rank(), dist.get_world_size()
    rows = torch.full((rank + 1, 3), float(rank), requires_grad=True)
    send_counts = torch.zeros(ranks, dtype=torch.long)
    send_counts[0] = rank + 1
    received, recv_counts = all_to_all_dispatch(rows, send_counts, group)
    back = all_to_all_combine(received * 2, send_counts, recv_counts, group)
    (back * (rank + 1)).sum().backward()
    try:
        all_to_all_dispatch(rows, send_counts[:1], group)
        bad_counts_error = None
    except ValueError as error:
        bad_counts_error = str(error)
    return {'received': received.detach(), 'recv_counts': recv_counts, 'back': back.detach(), 'grad': rows.grad,
            'bad_counts_error': bad_counts_error}


def main(out: str) -> None:
    import twinkle
    from twinkle import DeviceMesh
    mesh = DeviceMesh.from_sizes(ep_size=int(os.environ['WORLD_SIZE']))
    twinkle.initialize(mode='local', global_device_mesh=mesh)
    result = {'random': run_ep_rank(mesh, forced=False), 'forced': run_ep_rank(mesh, forced=True),
              'exchange': check_uneven_exchange(mesh.group('ep'))}
    torch.save(result, Path(out) / f'rank{dist.get_rank()}.pt')
    dist.barrier()
    dist.destroy_process_group()  # without it, exiting waits tens of seconds on gloo's teardown


def launch(nproc: int, out: Path, job: str = 'tests.parallel.ep_job', *args: str, timeout: float = 600) -> List[dict]:
    """Run ``job`` (a module with ``main(out, *args)``) on ``nproc`` ranks; returns each rank's saved results."""
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
               '-m', job, str(out), *args]
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'TWINKLE_LOG_LEVEL': 'WARNING', 'TWINKLE_DEVICE': 'cpu'}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f'{job} on {nproc} ranks failed ({done.returncode}):\n{done.stderr[-4000:]}')
    return [torch.load(out / f'rank{rank}.pt') for rank in range(nproc)]


if __name__ == '__main__':
    from tests.torchrun_job import run
    run(main, *sys.argv[1:])
