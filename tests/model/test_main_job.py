"""The main job (`make train`): LoRA finetune of the tiny Qwen3-MoE, on one process and with expert
parallelism on 2 ranks; its checkpoint holds every expert's adapter and loads on one process."""
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from twinkle import assets

pytestmark = pytest.mark.slow  # whole torchrun jobs: make test-quick leaves them out

ROOT = pathlib.Path(__file__).resolve().parents[2]
ARGS = ['--samples', '16', '--epochs', '1', '--batch-size', '8']  # 2 optimizer steps


def run_main_job(out: pathlib.Path, nproc: int, cache: pathlib.Path = None) -> str:
    """``cache``: a TWINKLE_CACHE for the job (an empty one: first use, assets and C++ kernels built by
    both ranks at once)."""
    launcher = [] if nproc == 1 else ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
    command = [sys.executable, *launcher, str(ROOT / 'examples' / 'train.py'), *ARGS,
               '--output', str(out / 'last-checkpoint')]
    env = dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', TWINKLE_DEVICE='cpu')
    if cache is not None:
        env['TWINKLE_CACHE'] = str(cache)
    done = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout + done.stderr


@pytest.fixture(scope='module', params=[1, 2], ids=['one_process', 'ep2'])
def main_job(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f'main{request.param}')
    cache = tmp_path_factory.mktemp('empty-cache') if request.param == 2 else None
    return request.param, out, run_main_job(out, request.param, cache)


def test_main_job_trains_summarises_and_saves(main_job):
    nproc, out, output = main_job
    assert 'loss: first' in output and 'trained tokens/s' in output
    assert ('ep_size=2' if nproc == 2 else 'one process') in output
    assert 'held-out question:' in output and 'name' in output.split('held-out question:')[1].splitlines()[0]
    assert 'before training:' in output and 'after training:' in output
    assert output.count(' MiB') >= nproc and 'peak memory per rank' in output
    for op in ('moe_permute', 'grouped_experts', 'moe_unpermute', 'fused_linear_cross_entropy', 'rms_norm'):
        assert op in output.split('kernels:')[1], op
    png = out / 'loss_curve.png'
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    if nproc == 2:
        assert 'this rank holds experts 0-3 of 8' in output


def test_checkpoint_holds_every_experts_adapter_and_loads_on_one_process(main_job):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    _, out, _ = main_job
    saved = load_file(out / 'last-checkpoint' / 'adapter_model.safetensors')
    expert_keys = [key for key in saved if '.experts.' in key]
    assert expert_keys
    base = AutoModelForCausalLM.from_pretrained(assets.tiny_model_path('qwen3_moe'))
    model = PeftModel.from_pretrained(base, out / 'last-checkpoint')
    loaded = {name.replace('.default', ''): p for name, p in model.named_parameters() if 'lora_' in name}
    for key in expert_keys:  # shapes of a one-process adapter over all 8 experts, values as saved
        torch.testing.assert_close(loaded[key], saved[key], rtol=0, atol=0, msg=key)
    logits = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize('main_job', [2], indirect=True, ids=['ep2'])
def test_ep_checkpoint_loads_back_into_an_expert_parallel_transformers_model(main_job, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .ep_reload_job import PROBE
    _, out, _ = main_job
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
               '-m', 'tests.model.ep_reload_job', str(out / 'last-checkpoint'), str(tmp_path)]
    env = dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', TWINKLE_DEVICE='cpu')
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    base = AutoModelForCausalLM.from_pretrained(assets.tiny_model_path('qwen3_moe'))
    expected = PeftModel.from_pretrained(base, out / 'last-checkpoint').eval()(input_ids=PROBE).logits.detach()
    for rank in range(2):
        got = torch.load(tmp_path / f'rank{rank}.pt')
        torch.testing.assert_close(got, expected[rank:rank + 1], rtol=1e-5, atol=1e-5)
