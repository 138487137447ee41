"""TransformersModel under torchrun on gloo: FSDP2 on 2 ranks trains exactly like one process, and
the seeds' torchrun example (FSDP x DP on 4 ranks) runs."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
ENV = dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', OMP_NUM_THREADS='1', TWINKLE_DEVICE='cpu')


def torchrun(nproc, *args, cwd=None):
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', *args]
    result = subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.parametrize('mode', ['full', 'lora'])
def test_fsdp2_two_ranks_equal_one_process(tmp_path, mode):
    job = str(ROOT / 'tests' / 'model' / 'fsdp_job.py')
    single, double = tmp_path / 'one.json', tmp_path / 'two.json'
    result = subprocess.run([sys.executable, job, str(single), mode], env=ENV, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    torchrun(2, job, str(double), mode)
    one, two = json.loads(single.read_text()), json.loads(double.read_text())
    assert len(one) == len(two) == 5
    assert two == pytest.approx(one, rel=1e-5)


def test_seeds_torchrun_example_on_four_ranks(tmp_path):
    ENV['NUM_SAMPLES'] = '32'
    try:
        result = torchrun(4, str(ROOT / 'examples' / 'torchrun.py'), cwd=tmp_path)
    finally:
        ENV.pop('NUM_SAMPLES')
    assert 'Current is step 0 of 4' in result.stderr
    assert (tmp_path / 'last-checkpoint' / 'adapter_model.safetensors').exists()
