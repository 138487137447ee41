"""Launching the megatron-core jobs: CPU processes under torchrun on gloo, CUDA hidden (the shim
never patches a process that can see a GPU)."""
import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
import torch

REPO = Path(__file__).resolve().parents[3]
ENV = {**os.environ, 'HF_HUB_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1', 'OMP_NUM_THREADS': '1',
       'TWINKLE_DEVICE': 'cpu', 'TWINKLE_LOG_LEVEL': 'INFO', 'CUDA_VISIBLE_DEVICES': ''}


def launch(job: str, nproc: int, out: Path, *args: str, timeout: float = 300):
    """Run ``tests.model.megatron.<job>`` on ``nproc`` ranks; (each rank's saved result, stderr)."""
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
               '-m', f'tests.model.megatron.{job}', str(out), *args]
    done = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f'{job} on {nproc} ranks failed ({done.returncode}):\n{done.stderr[-4000:]}')
    results: List[dict] = [torch.load(out / f'rank{rank}.pt', weights_only=True) for rank in range(nproc)]
    return results, done.stderr


@pytest.fixture(scope='session')
def gpt_job(tmp_path_factory):
    """The 2-rank GPTModel job (tp=1 twin, then tp=2 with sequence parallelism): results, stderr."""
    return launch('gpt_job', 2, tmp_path_factory.mktemp('megatron_gpt'))
