"""Training the tiny Qwen3-MoE with expert parallelism equals one process: EP=2 on 2 ranks,
EP=2 x FSDP=2 and HSDP dp=2 x EP=2 on 4 (gloo, CPU); full-parameter, LoRA (attention + expert
parameters), a routing that sends every token to EP rank 0's experts, bf16 compute against the
fp32 process (stated tolerances), and LoRA on the kernelized model (twinkle's experts under the
all-to-all dispatcher; the other kinds keep Hugging Face's experts). 3 steps with clipping (acting in full training)."""
import pytest
import torch

from .ep_job import build_model, launch
from .ep_train_job import KINDS

RTOL = 1e-5  # relative to each tensor's scale; fp32 on both sides, only summation orders differ
# bf16 compute (FSDP policy) against the fp32 twin, relative to each tensor's scale; measured worst on
# 2 ranks: logits 5e-3, gradients 1.8e-2, weights after 3 steps 3e-3, loss sums 4e-3, norms 3e-3
BF16_RTOL = {'logits': 1e-2, 'grads': 4e-2, 'weights': 1e-2, 'loss': 1e-2, 'grad_norm': 1e-2}


@pytest.fixture(scope='module', params=[(2, 'fsdp'), (4, 'fsdp'), (4, 'dp')], ids=['ep2', 'ep2xfsdp2', 'dp2xep2'])
def ranks(request, tmp_path_factory):
    nproc, other_dim = request.param
    out = tmp_path_factory.mktemp(f'ep_train{nproc}{other_dim}')
    return out, launch(nproc, out, 'tests.parallel.ep_train_job', other_dim)


def assert_scaled_close(got: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    assert got.shape == expected.shape, what
    atol = rtol * float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol, msg=what)


def tolerance(kind: str, what: str) -> float:
    return BF16_RTOL[what.split(':')[0]] if kind == 'bf16' else RTOL


@pytest.mark.parametrize('kind', KINDS)
def test_logits_gradients_and_updated_weights_equal_one_process(ranks, kind):
    _, results = ranks
    for rank, result in enumerate(results):
        compared = result[kind]['compared']
        assert {name.split(':')[0] for name in compared} == {'logits', 'grads', 'weights'}
        for what, (got, expected) in compared.items():
            assert_scaled_close(got, expected, f'rank {rank} {kind} {what}', tolerance(kind, what))


@pytest.mark.parametrize('kind', KINDS)
def test_loss_and_clipped_norm_trajectories_equal_one_process(ranks, kind):
    _, results = ranks
    for result in results:
        for key, (got, expected) in result[kind]['trajectory'].items():
            torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=tolerance(kind, key), atol=0,
                                       msg=key)
    assert results[0]['full']['trajectory']['grad_norm'][0][0] > 0.5  # MAX_NORM: clipping acted


def test_expert_lora_is_trained_per_rank(ranks):
    _, results = ranks
    names = [name for name in results[0]['lora']['compared'] if name.startswith('grads:')]
    assert any('experts' in name and 'lora_B' in name for name in names)
    assert any('experts' in name and 'lora_A' in name for name in names)


def test_each_rank_holds_half_of_the_experts(ranks):
    _, results = ranks
    for result in results:
        got, expected = result['full']['compared']['weights:model.layers.0.mlp.experts.gate_up_proj']
        assert got.shape[0] == 2  # of 4 experts
    assert 'ep_size=2' in results[0]['placement']


def test_full_checkpoint_holds_every_expert_and_loads_on_one_process(ranks):
    out, _ = ranks
    from transformers import Qwen3MoeForCausalLM
    for kind in ('full', 'forced'):
        expected = torch.load(out / f'{kind}_expected.pt')
        loaded = Qwen3MoeForCausalLM.from_pretrained(out / f'{kind}_checkpoint').state_dict()
        assert loaded['model.layers.0.mlp.experts.gate_up_proj'].shape[0] == 4
        for name, value in expected.items():
            assert_scaled_close(loaded[name], value, f'{kind} checkpoint {name}')


def test_lora_checkpoint_holds_full_expert_adapters(ranks):
    out, _ = ranks
    from peft import PeftModel
    expected = torch.load(out / 'lora_expected.pt')
    loaded = dict(PeftModel.from_pretrained(build_model(seed=3), out / 'lora_checkpoint').named_parameters())
    assert any('experts' in name for name in expected)
    for name, value in expected.items():
        assert_scaled_close(loaded[name], value, f'lora checkpoint {name}')


def test_sharded_checkpoint_restores_each_ranks_experts_and_momentum(ranks):
    _, results = ranks
    for result in results:
        assert any('experts' in name for name in result['resumed'])
        for what, (got, expected) in result['resumed'].items():
            torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=what)


def test_full_lora_checkpoint_loads_back_into_an_expert_parallel_model(ranks):
    _, results = ranks
    for result in results:
        reloaded = result['adapter_reloaded']
        assert any('experts' in name for name in reloaded)
        for what, (got, expected) in reloaded.items():
            torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=what)
