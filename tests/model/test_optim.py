"""Learning-rate schedules by name: warm-up, then cosine or linear decay to min_lr_ratio."""
import math

import pytest
import torch

from twinkle.model.optim import CosineWarmupScheduler, LinearWarmupScheduler, build_scheduler


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
