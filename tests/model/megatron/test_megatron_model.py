"""MegatronModel against one-process TransformersModel on the same data and seed (tests/model/megatron/
train_job.py: 5 steps of the seeds' loop, set_optimizer('default'), set_lr_scheduler('default'),
micro_batch_size=1 -- 4 micro-batches a step, which pp runs through its schedule --, clipping at
1.0), fp32 on CPU gloo.

Tolerances: trajectories rel 1e-5 (only the order of fp32 sums differs: tp splits GEMMs, ep moves
tokens); logits after the 5 steps 2e-5 of their scale (5 AdamW updates amplify those differences).
"""
import pytest
import torch
from transformers import AutoModelForCausalLM

from twinkle import assets

from .conftest import launch

RTOL = 1e-5
LOGITS_RTOL = 2e-5


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """name -> (rank-0 result, output dir), run on first use."""
    found = {}

    def run(model: str, sizes: str, nproc: int):
        key = (model, sizes)
        if key not in found:
            out = tmp_path_factory.mktemp(f'{model}-{sizes or "one"}'.replace('=', '').replace(',', '-'))
            results, _ = launch('train_job', nproc, out, model, sizes, timeout=400)
            found[key] = results[0], out
        return found[key]
    return run


def assert_same_trajectory(got, expected):
    for key in ('loss', 'grad_norm'):
        torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(expected[key]), rtol=RTOL, atol=0, msg=key)


def assert_close_to_scale(got, expected, rtol):
    scale = expected.abs().max()
    assert float((got - expected).abs().max()) <= rtol * float(scale), float((got - expected).abs().max() / scale)


@pytest.mark.parametrize('model', ['qwen3', 'qwen3_moe'])
def test_one_process_trains_like_transformers_model(runs, model):
    result, _ = runs(model, '', 1)
    assert_same_trajectory(result['megatron'], result['transformers'])
    assert result['parameters'] == result['transformers_parameters']
    assert_close_to_scale(result['logits'], result['transformers_logits'], LOGITS_RTOL)


@pytest.mark.parametrize('model, sizes', [('qwen3', 'tp=2'), ('qwen3', 'pp=2'), ('qwen3_moe', 'ep=2'),
                                         ('qwen3_moe', 'tp=2')])
def test_two_ranks_train_like_one_transformers_model(runs, model, sizes):
    reference, _ = runs(model, '', 1)
    result, _ = runs(model, sizes, 2)
    assert_same_trajectory(result['megatron'], reference['transformers'])
    if 'pp' not in sizes:  # forward_only through the pipeline is not built yet
        assert_close_to_scale(result['logits'], reference['transformers_logits'], LOGITS_RTOL)


def test_tp2_holds_half_the_parameters_per_rank(runs):
    """The vocabulary-parallel embedding included (the tiny Qwen3 ties it to the head)."""
    reference, _ = runs('qwen3', '', 1)
    result, _ = runs('qwen3', 'tp=2', 2)
    assert result['parameters'] <= 0.65 * reference['transformers_parameters'], result['parameters']


@pytest.mark.slow
@pytest.mark.parametrize('sizes', ['dp=2,tp=2', 'tp=2,pp=2'])
def test_four_ranks_train_like_one_transformers_model(runs, sizes):
    """pp runs 4 micro-batches of one sample per step through megatron-core's 1F1B schedule."""
    reference, _ = runs('qwen3', '', 1)
    result, _ = runs('qwen3', sizes, 4)
    assert_same_trajectory(result['megatron'], reference['transformers'])


def saved_logits(out):
    loaded = AutoModelForCausalLM.from_pretrained(out / 'saved', dtype=torch.float32)
    ids = torch.randint(0, loaded.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return loaded(input_ids=ids).logits


@pytest.mark.parametrize('model, sizes, nproc', [('qwen3', 'tp=2', 2), ('qwen3_moe', 'ep=2', 2)])
def test_save_writes_a_hugging_face_model_with_the_trained_logits(runs, model, sizes, nproc):
    result, out = runs(model, sizes, nproc)
    assert_close_to_scale(saved_logits(out), result['logits'], 1e-5)


def test_save_gathers_the_pipeline_stages(runs):
    """pp=2: each stage's layers (and the tied embedding once) in one HF checkpoint; its logits are
    those of one-process TransformersModel trained on the same data."""
    reference, _ = runs('qwen3', '', 1)
    _, out = runs('qwen3', 'pp=2', 2)
    assert_close_to_scale(saved_logits(out), reference['transformers_logits'], LOGITS_RTOL)


def test_a_model_family_the_bridge_does_not_know_is_named(tmp_path):
    from transformers import GPT2Config

    from twinkle.model.megatron import MegatronModel
    GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match='model_type'):
        MegatronModel(model_id=str(tmp_path))


def test_tp_not_dividing_the_heads_is_named_before_any_group():
    from twinkle import DeviceMesh
    from twinkle.model.megatron import MegatronModel
    with pytest.raises(ValueError, match='tp=3'):
        MegatronModel(model_id=assets.tiny_model_path('qwen3'), device_mesh=DeviceMesh.from_sizes(tp_size=3))


def test_fsdp_on_megatron_model_points_at_dp():
    from twinkle import DeviceMesh
    from twinkle.model.megatron import MegatronModel
    with pytest.raises(ValueError, match='fsdp_size=2.*dp_size'):
        MegatronModel(model_id=assets.tiny_model_path('qwen3'), device_mesh=DeviceMesh.from_sizes(fsdp_size=2))
