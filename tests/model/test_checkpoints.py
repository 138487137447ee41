"""Checkpoints load with plain peft / transformers, and resuming continues exactly."""
import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM

from tests.model.conftest import token_batch
from twinkle import assets
from twinkle.model import TransformersModel

MODEL = assets.tiny_model_path('qwen3')
VOCAB = 151936


def logits_of(model, input_ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def trained(adapter: bool, steps=2, seed=0):
    torch.manual_seed(seed)
    model = TransformersModel(model_id=MODEL)
    if adapter:
        model.add_adapter_to_model('default', LoraConfig(r=4, lora_alpha=16, target_modules='all-linear',
                                                          init_lora_weights=False))
    model.set_optimizer('AdamW', lr=1e-2)
    model.set_lr_scheduler('CosineWarmupScheduler', num_warmup_steps=1, num_training_steps=10)
    for step in range(steps):
        model.forward_backward(inputs=token_batch(size=4, seed=step, vocab=VOCAB))
        model.clip_grad_and_step()
    return model


def test_lora_adapter_loads_with_plain_peft(tmp_path):
    model = trained(adapter=True)
    path = model.save('lora', output_dir=str(tmp_path))
    input_ids = torch.tensor([token_batch(size=1, vocab=VOCAB)[0]['input_ids']])
    expected = logits_of(model.model, input_ids)
    base = AutoModelForCausalLM.from_pretrained(MODEL)
    loaded = PeftModel.from_pretrained(base, path)
    torch.testing.assert_close(logits_of(loaded, input_ids), expected, rtol=1e-5, atol=1e-5)


def test_full_checkpoint_loads_with_plain_transformers(tmp_path):
    model = trained(adapter=False)
    path = model.save('full', output_dir=str(tmp_path))
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert type(loaded).__name__ == 'Qwen3ForCausalLM'
    input_ids = torch.tensor([token_batch(size=1, vocab=VOCAB)[0]['input_ids']])
    torch.testing.assert_close(logits_of(loaded, input_ids), logits_of(model.model, input_ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('adapter', [True, False])
def test_resume_gives_the_uninterrupted_next_loss(tmp_path, adapter):
    uninterrupted = trained(adapter, steps=3)
    next_batch = token_batch(size=4, seed=99, vocab=VOCAB)
    expected = uninterrupted.forward_backward(inputs=next_batch)['loss']

    interrupted = trained(adapter, steps=2)
    path = interrupted.save('ckpt', output_dir=str(tmp_path), save_optimizer=True)
    resumed = trained(adapter, steps=0, seed=123)  # fresh weights, optimizer and schedule
    resumed.resume_from_checkpoint(path)
    resumed.forward_backward(inputs=token_batch(size=4, seed=2, vocab=VOCAB))  # the 3rd step
    resumed.clip_grad_and_step()
    assert resumed.forward_backward(inputs=next_batch)['loss'] == pytest.approx(expected, rel=1e-6)


def test_load_without_optimizer_state_is_refused(tmp_path):
    model = trained(adapter=True, steps=1)
    path = model.save('no-optim', output_dir=str(tmp_path))
    with pytest.raises(ValueError, match='save_optimizer'):
        model.resume_from_checkpoint(path)
