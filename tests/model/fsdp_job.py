"""A TransformersModel training job for the distributed tests: same script on 1 process or under
torchrun; writes the global loss per step (metrics all-reduced over data ranks) to OUT."""
import json
import os
import sys
from pathlib import Path

import torch

import twinkle
from twinkle import DeviceMesh
from twinkle.dataloader import DataLoader
from twinkle.model import TransformersModel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests.model.conftest import token_batch  # noqa: E402


def main(out: str, lora: bool) -> None:
    from transformers import Qwen3Config
    world = int(os.environ.get('WORLD_SIZE', 1))
    twinkle.initialize(global_device_mesh=DeviceMesh.from_sizes(fsdp_size=world), seed=0)
    config = Qwen3Config(vocab_size=1024, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    model = TransformersModel(config=config)
    if lora:
        from peft import LoraConfig
        model.add_adapter_to_model('default', LoraConfig(r=4, lora_alpha=8, target_modules='all-linear',
                                                          init_lora_weights=False))
    model.set_optimizer('AdamW', lr=1e-2)
    losses = []
    for batch in DataLoader(token_batch(size=40, seed=3), batch_size=8, shuffle=False):
        model.forward_backward(inputs=batch)
        model.clip_grad_and_step(max_grad_norm=0.5)
        losses.append(model.calculate_metric()['loss'])
    if int(os.environ.get('RANK', 0)) == 0:
        with open(out, 'w') as handle:
            json.dump(losses, handle)


if __name__ == '__main__':  # launched by path: tests/ is importable once the repository root is on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.torchrun_job import run
    run(main, sys.argv[1], lora=sys.argv[2] == 'lora')
