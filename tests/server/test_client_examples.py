"""The seeds' client examples against a service started here: the SFT losses equal a local run's."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from twinkle import assets
from twinkle.dataloader import DataLoader
from twinkle.dataset import Dataset, DatasetMeta
from twinkle.model import TransformersModel

ROOT = Path(__file__).resolve().parents[2]
STEP = re.compile(r'step (\d+) (?:sequences \d+ )?loss ([-+0-9.e]+|nan|None)')


def run_client(script: str, server, key: str, tmp_path, **env):
    environment = dict(os.environ, TWINKLE_SERVER_URL=server.url, TWINKLE_SERVER_TOKEN=key, HF_HUB_OFFLINE='1',
                       TRANSFORMERS_OFFLINE='1', PYTHONPATH=str(ROOT), **env)
    result = subprocess.run([sys.executable, str(ROOT / 'examples' / 'server' / script)], cwd=tmp_path,
                            env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr + result.stdout


def local_sft_losses(steps: int, lr: float):
    """The same adapter, data, seed and optimizer on a local TransformersModel."""
    model_id = assets.tiny_model_path('qwen3')
    dataset = Dataset(dataset_meta=DatasetMeta(assets.self_cognition_path(), data_slice=range(4 * steps)))
    dataset.set_template('Qwen3_5Template', model_id=model_id, max_length=256)
    dataset.map('SelfCognitionProcessor', init_args={'model_name': 'twinkle LLM', 'model_author': 'ModelScope Community'})
    dataset.encode(batched=True)
    model = TransformersModel(model_id=model_id, mixed_precision='fp32')
    torch.manual_seed(42)  # the service draws each adapter's initialisation from its seed (default 42)
    model.add_adapter_to_model('default', LoraConfig(target_modules='all-linear'), gradient_accumulation_steps=1)
    model.set_template('Qwen3_5Template', model_id=model_id)
    model.set_processor('InputProcessor', padding_side='right')
    model.set_loss('CrossEntropyLoss')
    model.set_optimizer('AdamW', lr=lr)
    losses = []
    for batch in DataLoader(dataset=dataset, batch_size=4, shuffle=False):
        model.forward_backward(inputs=batch)
        model.clip_grad_and_step()
        losses.append(model.calculate_metric(is_training=True)['loss'])
    return losses


@pytest.mark.slow
def test_client_sft_example_repeats_the_local_losses(server, tmp_path):
    output = run_client('client_sft.py', server, 'key-e', tmp_path, STEPS='3')
    remote = [float(loss) for _, loss in STEP.findall(output)]
    assert len(remote) == 3, output[-3000:]
    assert remote == pytest.approx(local_sft_losses(3, 1e-3), rel=1e-5)
    assert 'saved twinkle://erin/sft-final' in output


@pytest.mark.slow
def test_client_grpo_example_samples_with_its_saved_adapter_and_trains(server, tmp_path):
    output = run_client('client_grpo.py', server, 'key-f', tmp_path, STEPS='2')
    steps = re.findall(r'step (\d) sequences (\d+) loss ([-+0-9.e]+)', output)
    assert [(step, count) for step, count, _ in steps] == [('0', '8'), ('1', '8')], output[-3000:]
    assert 'saved twinkle://frank/grpo-countdown-final' in output
