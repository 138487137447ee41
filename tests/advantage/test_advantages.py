"""Advantages against values computed by hand."""
import math

import pytest
import torch

from twinkle.advantage import GRPOAdvantage, RLOOAdvantage

# two prompts x 4 generations: a group with a tie, a group of equal rewards
REWARDS = [1.0, 0.0, 1.0, 2.0, 0.5, 0.5, 0.5, 0.5]


def test_grpo_group_scale_by_hand():
    mean, std = 1.0, math.sqrt(((0) ** 2 + 1 + 0 + 1) / 3)  # group 0: sample std = sqrt(2/3)
    want = [(r - mean) / (std + 1e-4) for r in REWARDS[:4]] + [0.0] * 4
    got = GRPOAdvantage()(REWARDS, num_generations=4, scale='group')
    assert got.dtype == torch.float32 and got.shape == (8,)
    assert got.tolist() == pytest.approx(want, abs=1e-6)
    assert not torch.isnan(got).any()


def test_grpo_batch_and_none_scales_by_hand():
    batch_std = torch.tensor(REWARDS).std().item()
    centred = [0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert GRPOAdvantage()(REWARDS, num_generations=4, scale='none').tolist() == pytest.approx(centred)
    assert GRPOAdvantage()(REWARDS, num_generations=4, scale='batch').tolist() == pytest.approx(
        [c / (batch_std + 1e-4) for c in centred], abs=1e-6)


def test_rloo_leave_one_out_by_hand():
    # group 0: r_i - mean of the other three
    want = [1 - 1, 0 - 4 / 3, 1 - 1, 2 - 2 / 3] + [0.0] * 4
    assert RLOOAdvantage()(REWARDS, num_generations=4, scale='none').tolist() == pytest.approx(want, abs=1e-6)
    scaled = RLOOAdvantage()(REWARDS, num_generations=4, scale='group')
    assert scaled[4:].tolist() == [0.0] * 4 and scaled[3].item() == pytest.approx((4 / 3) / (math.sqrt(2 / 3) + 1e-4))


def test_all_equal_rewards_give_zero_never_nan():
    for fn in (GRPOAdvantage(), RLOOAdvantage()):
        for scale in ('group', 'batch', 'none'):
            assert fn([3.0] * 6, num_generations=3, scale=scale).tolist() == [0.0] * 6


def test_one_generation_per_prompt_has_no_group_signal():
    assert GRPOAdvantage()([1.0, 2.0], num_generations=1).tolist() == [0.0, 0.0]


@pytest.mark.parametrize('call, match', [
    (lambda: GRPOAdvantage()([1.0, 2.0, 3.0], num_generations=2), 'num_generations=2 does not divide the 3'),
    (lambda: GRPOAdvantage()([1.0, float('nan')], num_generations=2), 'finite.*indices \\[1\\]'),
    (lambda: GRPOAdvantage()([1.0, 2.0], num_generations=0), 'num_generations must be a positive int'),
    (lambda: GRPOAdvantage()([1.0, 2.0], num_generations=2, scale='std'), 'scale must be one of'),
    (lambda: RLOOAdvantage()([1.0, 2.0], num_generations=1), 'num_generations >= 2'),
    (lambda: GRPOAdvantage()([[1.0, 2.0]], num_generations=2), 'flat sequence'),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
