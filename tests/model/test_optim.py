"""Learning-rate schedules by name: warm-up, then cosine or linear decay to min_lr_ratio."""
import math

import pytest
import torch

from twinkle.model.optim import CosineWarmupScheduler, LinearWarmupScheduler, build_optimizer, build_scheduler


def schedule(scheduler_cls, steps, **kwargs):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=2.0)
    scheduler = scheduler_cls(optimizer, **kwargs)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]['lr'])
        optimizer.step()
        scheduler.step()
    return lrs


def test_cosine_warmup_shape():
    lrs = schedule(CosineWarmupScheduler, 7, num_warmup_steps=2, num_training_steps=6)
    assert lrs == pytest.approx([2 / 3, 4 / 3, 2.0, 1 + math.cos(math.pi / 4), 1.0, 1 - math.cos(math.pi / 4), 0.0])


def test_linear_warmup_decays_to_min_ratio():
    lrs = schedule(LinearWarmupScheduler, 6, num_warmup_steps=1, num_training_steps=5, min_lr_ratio=0.1)
    assert lrs == pytest.approx([1.0, 2.0, 2 * (0.1 + 0.9 * 0.75), 2 * (0.1 + 0.9 * 0.5), 2 * (0.1 + 0.9 * 0.25), 0.2])


def test_bad_step_counts_are_refused():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
    with pytest.raises(ValueError, match='num_training_steps'):
        build_scheduler('CosineWarmupScheduler', optimizer, num_warmup_steps=1, num_training_steps=0)


def test_the_default_scheduler_warms_up_to_max_lr_and_decays_over_lr_decay_steps():
    """The seeds' ``set_lr_scheduler('default', lr_decay_steps=..., max_lr=...)``: max_lr replaces the
    optimizer's lr; cosine to min_lr at lr_decay_steps."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=123.0)
    scheduler = build_scheduler('default', optimizer, lr_decay_steps=4, max_lr=2.0, min_lr=0.2)
    lrs = []
    for _ in range(5):
        lrs.append(optimizer.param_groups[0]['lr'])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([2.0, 0.2 + 1.8 * (1 + math.cos(math.pi / 4)) / 2, 1.1,
                                 0.2 + 1.8 * (1 - math.cos(math.pi / 4)) / 2, 0.2])


@pytest.mark.parametrize('kwargs, message', [({'max_lr': 0.0}, 'max_lr'), ({'min_lr': 5.0}, 'min_lr')])
def test_the_default_scheduler_names_a_bad_argument(kwargs, message):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
    with pytest.raises(ValueError, match=message):
        build_scheduler('default', optimizer, lr_decay_steps=4, **kwargs)


def test_the_default_optimizer_is_adamw():
    assert isinstance(build_optimizer('default', [torch.nn.Parameter(torch.ones(1))], lr=1e-3), torch.optim.AdamW)


def test_main_params_keep_the_updates_bf16_weights_round_away():
    """100 SGD steps of 1e-4 on a weight of 1.0: bf16 (resolution 2^-7 there) never moves alone; with
    fp32 main copies the weight is the rounded main value, 1 - 1e-2 (within 100 fp32 roundings, 1e-5)."""
    from twinkle.model.optim import MainParamsOptimizer
    plain = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    mixed = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    adapter = torch.nn.Parameter(torch.ones(2))  # fp32: its own main copy
    optimizers = [torch.optim.SGD([plain], lr=1e-4), MainParamsOptimizer('SGD', [mixed, adapter], lr=1e-4)]
    for _ in range(100):
        for parameter in (plain, mixed, adapter):
            parameter.grad = torch.ones_like(parameter)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    main = optimizers[1].main_params[0]
    assert torch.equal(plain, torch.ones_like(plain))
    assert main.dtype == torch.float32 and torch.allclose(main, torch.full((3,), 0.99), rtol=0, atol=1e-5)
    assert torch.equal(mixed, main.to(torch.bfloat16)) and mixed.grad is None
    assert optimizers[1].main_params[1] is adapter and torch.allclose(adapter, torch.full((2,), 0.99), rtol=0, atol=1e-5)


def test_main_params_resume_from_the_main_copies_and_drive_a_scheduler():
    from twinkle.model.optim import MainParamsOptimizer, build_scheduler
    weight = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    optimizer = MainParamsOptimizer('AdamW', [weight], lr=1e-3)
    scheduler = build_scheduler('default', optimizer, lr_decay_steps=4)
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]['lr'] < 1e-3
    saved = optimizer.state_dict()
    other = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    resumed = MainParamsOptimizer('AdamW', [other], lr=1e-3)
    resumed.load_state_dict(saved)
    assert torch.equal(resumed.main_params[0], optimizer.main_params[0]) and torch.equal(other, weight)
    assert resumed.state[resumed.main_params[0]]['step'] == 1
    with pytest.raises(ValueError, match='main copies'):
        MainParamsOptimizer('AdamW', [torch.nn.Parameter(torch.ones(2))]).load_state_dict(saved)
