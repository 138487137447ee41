"""Run under torchrun: every rank builds the same tiny model at once, after torch.distributed is up.

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m tests.data.asset_build_job OUT_DIR

That is the set-up in which transformers >= 5.24 writes model weights on rank 0 only; each rank
writes ``OUT_DIR/rank<r>.json`` with the directory it got, its files and a checksum of the weights.
"""
import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main(out: Path) -> None:
    dist.init_process_group('gloo', timeout=datetime.timedelta(seconds=120))
    try:
        dist.barrier()  # both ranks start building together
        from transformers import AutoModelForCausalLM

        from twinkle import assets
        path = assets.tiny_model_path('qwen3')
        model = AutoModelForCausalLM.from_pretrained(path)
        checksum = sum(float(p.double().sum()) for p in model.state_dict().values())
        report = dict(path=path, files=sorted(os.listdir(path)), checksum=checksum)
        (out / f'rank{dist.get_rank()}.json').write_text(json.dumps(report))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == '__main__':
    main(Path(sys.argv[1]))
