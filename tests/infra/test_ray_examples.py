"""The Ray examples end to end on a local cluster: SFT equals its torchrun twin, GRPO across two groups."""
import difflib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip('ray', reason="Ray mode needs the 'ray' extra")

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', OMP_NUM_THREADS='1', RAY_AUTH_MODE='disabled',
           CUDA_VISIBLE_DEVICES='')
STEP = re.compile(r'step (\d+) loss ([-+0-9.e]+|nan)')


def run_timed(command, cwd):
    """(losses, seconds from launch to the first step's line, output)."""
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_step, lines = None, []
    for line in process.stdout:
        lines.append(line)
        if first_step is None and STEP.search(line):
            first_step = time.monotonic() - started
    assert process.wait(timeout=600) == 0, ''.join(lines)[-4000:]
    output = ''.join(lines)
    return [float(loss) for _, loss in STEP.findall(output)], first_step, output


@pytest.mark.slow
def test_ray_sft_example_repeats_the_torchrun_losses_and_differs_only_in_initialize(tmp_path):
    ray_script, torchrun_script = ROOT / 'examples' / 'ray_sft.py', ROOT / 'examples' / 'sft.py'
    changed = [line for line in difflib.unified_diff(torchrun_script.read_text().splitlines(),
                                                     ray_script.read_text().splitlines(), lineterm='', n=0)
               if line[:1] in '+-' and not line.startswith(('+++', '---'))]
    assert len(changed) == 2 and all(line[1:].startswith('twinkle.initialize(') for line in changed), changed
    (tmp_path / 'torchrun').mkdir()
    (tmp_path / 'ray').mkdir()
    local, local_start, _ = run_timed([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                                       '--nproc_per_node=2', str(torchrun_script)], tmp_path / 'torchrun')
    remote, remote_start, output = run_timed([sys.executable, str(ray_script)], tmp_path / 'ray')
    print(f'driver-to-first-step: torchrun {local_start:.1f} s, local Ray {remote_start:.1f} s')
    assert len(local) == len(remote) == 5, output[-3000:]
    assert remote == pytest.approx(local, rel=1e-5)
    assert len(set(local)) == 5  # it trains: every step's loss differs
    assert (tmp_path / 'ray' / 'last-checkpoint' / 'adapter_model.safetensors').exists()
    assert not list((tmp_path / 'ray').glob('last-checkpoint.tmp-*'))  # the last save finished before shutdown


@pytest.mark.slow
def test_ray_grpo_example_trains_across_model_and_sampler_groups_and_syncs_bit_for_bit(tmp_path):
    command = [sys.executable, str(ROOT / 'examples' / 'ray_grpo.py'), '--reward', 'toy', '--steps', '3',
               '--check-sync', '--timeout', '300']
    result = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "group 'model' ready: 2 cpu rank(s)" in result.stderr and "group 'sampler' ready: 1 cpu" in result.stderr
    steps = re.findall(r'\[Step (\d)/3\] reward ([0-9.]+) loss ([-0-9.]+)', result.stdout)
    assert [step for step, _, _ in steps] == ['1', '2', '3'], result.stdout
    assert any(float(loss) != 0 for _, _, loss in steps)  # the toy reward has signal: the adapter moves
    assert re.search(r'sync check: (\d+) adapter tensors equal bit for bit in every sampler rank', result.stdout)
