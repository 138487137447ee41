"""The seeds' single-device example runs unchanged but for the model and data ids (fewer samples); the
Megatron example on 4 ranks."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_single_device_example_trains_and_saves(tmp_path):
    env = dict(os.environ, NUM_SAMPLES='48', HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1')
    result = subprocess.run([sys.executable, str(ROOT / 'examples' / 'single_device.py')], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'Current is step 0 of 6' in result.stderr
    assert (tmp_path / 'last-checkpoint' / 'adapter_model.safetensors').exists()


@pytest.mark.slow
def test_megatron_example_trains_on_four_ranks_and_saves_a_peft_adapter(tmp_path):
    """`make train BACKEND=megatron NPROC=4`'s first job, shortened: LoRA on tiny Qwen3-MoE at tp=2 x ep=2."""
    env = dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', TWINKLE_DEVICE='cpu', CUDA_VISIBLE_DEVICES='',
               OMP_NUM_THREADS='1')
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=4',
               str(ROOT / 'examples' / 'megatron.py'), '--model', 'qwen3_moe', '--steps', '3', '--batch-size', '4',
               '--output', str(tmp_path / 'saved')]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'qwen3_moe on ep_size=2 x tp_size=2: loss' in result.stdout, result.stdout[-2000:]
    from peft import PeftConfig
    config = PeftConfig.from_pretrained(tmp_path / 'saved')
    assert set(config.target_modules) == {'q_proj', 'k_proj', 'v_proj', 'o_proj'} and config.r == 8


@pytest.mark.slow
def test_long_context_example_at_cp2_repeats_the_one_process_losses(tmp_path):
    """`make train CP_SIZE=2`, shortened: the same losses as one process, half the tokens per rank."""
    env = dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', TWINKLE_DEVICE='cpu', OMP_NUM_THREADS='1')
    script, flags = str(ROOT / 'examples' / 'long_context.py'), ['--length', '300', '--steps', '2']
    outputs = {}
    for name, launcher in (('one', [sys.executable]), ('cp2', [sys.executable, '-m', 'torch.distributed.run',
                                                                '--standalone', '--nproc_per_node=2'])):
        extra = ['--cp-size', '2'] if name == 'cp2' else []
        result = subprocess.run([*launcher, script, *flags, *extra], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[name] = result.stdout
    assert 'cp_size=2: 300 tokens per sequence, 150+ per rank' in outputs['cp2'], outputs['cp2']
    losses = {name: [float(v) for v in text.split('loss per step: ')[1].splitlines()[0].split(', ')]
              for name, text in outputs.items()}
    assert len(losses['one']) == 2 and losses['cp2'] == pytest.approx(losses['one'], rel=1e-4), losses
    assert outputs['cp2'].count(' MiB') == 2  # one peak per rank


def test_grpo_example_runs_five_steps_with_rewards_and_losses(tmp_path):
    """`make train JOB=grpo`: sampler, rewards, advantages, GRPO loss and weight sync, 5 steps."""
    env = dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', TWINKLE_DEVICE='cpu')
    result = subprocess.run([sys.executable, str(ROOT / 'examples' / 'grpo.py'), '--reward', 'toy', '--steps', '5'],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count('[Step ') == 5, result.stdout
    rewards = [float(v) for v in result.stdout.split('rewards per step: ')[1].split(', ')]
    assert len(rewards) == 5 and all(0.0 <= r <= 1.0 for r in rewards)
    assert 'sync_weights: adapter' in result.stderr


def run_grpo(tmp_path, *flags, nproc=1):
    env = dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', TWINKLE_DEVICE='cpu', OMP_NUM_THREADS='1')
    launcher = [sys.executable] if nproc == 1 else [sys.executable, '-m', 'torch.distributed.run', '--standalone',
                                                     f'--nproc_per_node={nproc}']
    result = subprocess.run([*launcher, str(ROOT / 'examples' / 'grpo.py'), '--reward', 'toy', *flags], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [line for line in result.stdout.splitlines() if line.startswith('[Step ')]
    losses = [float(line.split(' loss ')[1].split()[0]) for line in steps]
    rewards = [float(v) for v in result.stdout.split('rewards per step: ')[1].split(', ')]
    return rewards, losses, result


@pytest.mark.slow
def test_grpo_example_under_torchrun_with_model_and_sampler_on_separate_ranks(tmp_path):
    """torchrun: rank 0 trains, the last rank samples (each role its own world, weights over the sync
    group, rollouts over the object channel); with two model ranks (FSDP) the run is the same."""
    one_model_rank = run_grpo(tmp_path, '--steps', '3', '--timeout', '120', nproc=2)
    two_model_ranks = run_grpo(tmp_path, '--steps', '3', '--timeout', '120', nproc=3)
    rewards, losses, result = one_model_rank
    assert len(rewards) == len(losses) == 3 and all(0.0 <= r <= 1.0 for r in rewards)
    assert '[rank1]' in result.stderr and 'sync_weights: adapter, 28 tensors' in result.stderr
    assert two_model_ranks[0] == rewards and two_model_ranks[1] == pytest.approx(losses, abs=1e-4)
    assert two_model_ranks[2].stdout.count('[Step ') == 3  # printed by the first model rank only


@pytest.mark.slow
def test_grpo_toy_reward_rises_over_thirty_steps_and_is_drawn(tmp_path):
    rewards, _, _ = run_grpo(tmp_path, '--steps', '30', '--plot', str(tmp_path / 'curve.png'))
    assert len(rewards) == 30
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.2, rewards
    assert (tmp_path / 'curve.png').stat().st_size > 10_000
