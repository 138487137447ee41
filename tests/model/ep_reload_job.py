"""The main job's adapter loaded back into TransformersModel under expert parallelism.

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m tests.model.ep_reload_job CHECKPOINT OUT

Each rank loads the full adapter (every expert) into an EP=2 model, takes its slices, and saves the
logits of its row of ``PROBE`` to ``OUT/rank<r>.pt``.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

PROBE = torch.tensor([[151644, 872, 198, 14990, 0, 13, 151645], [151644, 77091, 198, 40, 1079, 264, 151645]])


def main(checkpoint: str, out: str) -> None:
    from peft import LoraConfig

    import twinkle
    from twinkle import DeviceMesh, assets
    from twinkle.model import TransformersModel
    mesh = DeviceMesh.from_sizes(ep_size=2)
    twinkle.initialize(global_device_mesh=mesh)
    model = TransformersModel(model_id=assets.tiny_model_path('qwen3_moe'))
    model.add_adapter_to_model('default', LoraConfig.from_pretrained(checkpoint))
    model.load(checkpoint)
    rank = mesh.data_rank
    logits = model.forward_only({'input_ids': PROBE[rank:rank + 1]}).logits
    torch.save(logits, Path(out) / f'rank{dist.get_rank()}.pt')
    dist.barrier()
    dist.destroy_process_group()


if __name__ == '__main__':
    from tests.torchrun_job import run
    run(main, *sys.argv[1:])
