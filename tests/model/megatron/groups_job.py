"""Megatron's view of its groups for several meshes on one world (groups built, checked, destroyed).

    python -m torch.distributed.run --standalone --nproc_per_node=4 -m tests.model.megatron.groups_job OUT_DIR

``OUT_DIR/rank<r>.pt`` maps each mesh's sizes ('tp_size=2 x pp_size=2') to ``megatron_view()``.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import twinkle
from twinkle import DeviceMesh
from twinkle.model.megatron import destroy_megatron_groups, initialize_megatron_groups

from .gpt_job import TIMEOUT, megatron_view

MESHES = (dict(tp_size=2, pp_size=2), dict(tp_size=2, dp_size=2), dict(tp_size=2, ep_size=2))


def main(out: str) -> None:
    twinkle.initialize(seed=0, timeout=TIMEOUT)
    views = {}
    for sizes in MESHES:
        mesh = DeviceMesh.from_sizes(**sizes)
        initialize_megatron_groups(mesh, timeout=TIMEOUT)
        views[mesh.describe_sizes()] = megatron_view()
        destroy_megatron_groups()
    torch.save(views, Path(out) / f'rank{dist.get_rank()}.pt')


if __name__ == '__main__':
    from tests.torchrun_job import run
    run(main, *sys.argv[1:])
