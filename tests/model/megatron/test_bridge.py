"""twinkle's HF <-> megatron-core bridge: exact weight round trips at every tp/pp/ep split, the
layouts checked against the heads and rows they come from, Megatron's own layer placement, the
GPTModel's logits on CPU gloo ranks against the Hugging Face model's (fp32: 1e-5 of their scale),
and every bad input refused with the argument's name before a process group exists."""
import itertools

import megatron.core  # noqa: F401  (the suite installs the megatron extra)
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config, Qwen3Config

from twinkle import assets
from twinkle.model.megatron.bridge import (architecture, padded_vocab_size, stage_layers,
                                           transformer_config)
from twinkle.model.megatron.bridge_keys import hf_to_mcore, load_hf_state_dict, mcore_to_hf

from .conftest import launch

SCALE_RTOL = 1e-5  # fp32 logits: relative to their largest magnitude
SMALL = dict(vocab_size=1001, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8)


def tiny(name):
    path = assets.tiny_model_path(name)
    return AutoConfig.from_pretrained(path), load_hf_state_dict(path)


def random_model(config_class, **overrides):
    config = config_class(**{**SMALL, **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop('lm_head.weight')  # one tensor, saved under the embedding's name
    return config, state


def all_ranks(hf_state, config, tp, pp, ep, expert_layout='fused'):
    """Every rank's Megatron state dict, then the HF tensors put back together stage by stage."""
    ranks = {(p, t, e): hf_to_mcore(hf_state, config, tp_rank=t, tp_size=tp, pp_rank=p, pp_size=pp, ep_rank=e,
                                    ep_size=ep)
             for p, t, e in itertools.product(range(pp), range(tp), range(ep))}
    restored = {}
    for p in range(pp):
        stage = {(t, e): state for (q, t, e), state in ranks.items() if q == p}
        part = mcore_to_hf(stage, config, tp_size=tp, ep_size=ep, pp_rank=p, pp_size=pp, expert_layout=expert_layout)
        assert not part.keys() & restored.keys(), 'two pipeline stages wrote the same HF tensor'
        restored.update(part)
    return ranks, restored


def assert_same_tensors(got, expected):
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


@pytest.mark.parametrize('name,tp,pp,ep', [('qwen3', 1, 1, 1), ('qwen3', 2, 2, 1), ('qwen3_moe', 2, 2, 2),
                                           ('qwen3_moe', 1, 1, 4)])
def test_embedded_models_round_trip_exactly(name, tp, pp, ep):
    config, hf_state = tiny(name)
    _, restored = all_ranks(hf_state, config, tp, pp, ep)
    assert_same_tensors(restored, {key: hf_state[key] for key in hf_state})


@pytest.mark.parametrize('config_class,overrides', [(Qwen2Config, {}), (LlamaConfig, dict(tie_word_embeddings=False)),
                                                    (Qwen3Config, dict(tie_word_embeddings=True))])
def test_other_families_and_a_padded_vocab_round_trip_exactly(config_class, overrides):
    """Qwen2's q/k/v biases, Llama's own lm_head (on the last stage), and a vocab (1001) tp=2 does not divide."""
    config, hf_state = random_model(config_class, **overrides)
    ranks, restored = all_ranks(hf_state, config, tp=2, pp=2, ep=1)
    assert_same_tensors(restored, hf_state)
    embedding = [ranks[(0, t, 0)]['embedding.word_embeddings.weight'] for t in range(2)]
    assert [tuple(e.shape) for e in embedding] == [(501, 32)] * 2 == [(padded_vocab_size(1001, 2) // 2, 32)] * 2
    assert torch.equal(embedding[1][-1], torch.zeros(32)), 'the padding row is zero'
    head = [ranks[(1, t, 0)].get('output_layer.weight') for t in range(2)]
    assert head[0] is not None and head[0].shape == (501, 32)  # tied or not, pp=2: the last stage holds a head
    if config_class is Qwen2Config:
        assert ranks[(0, 0, 0)]['decoder.layers.0.self_attention.linear_qkv.bias'].shape == ((2 + 2) * 8,)


def test_tp_rank_holds_its_query_groups_and_mlp_rows():
    """tp=2 on the tiny Qwen3 (4 q heads, 2 kv heads, head_dim 16): rank r holds query group r, i.e.
    q heads 2r and 2r+1, k head r, v head r; fc1 is rank r's gate rows then its up rows."""
    config, hf_state = tiny('qwen3')
    for rank in range(2):
        state = hf_to_mcore(hf_state, config, tp_rank=rank, tp_size=2)
        q, k, v = (hf_state[f'model.layers.1.self_attn.{p}_proj.weight'] for p in 'qkv')
        heads = lambda w, first, count: w[first * 16:(first + count) * 16]  # noqa: E731
        expected_qkv = torch.cat([heads(q, 2 * rank, 2), heads(k, rank, 1), heads(v, rank, 1)])
        assert torch.equal(state['decoder.layers.1.self_attention.linear_qkv.weight'], expected_qkv)
        o = hf_state['model.layers.1.self_attn.o_proj.weight']
        assert torch.equal(state['decoder.layers.1.self_attention.linear_proj.weight'], o[:, 32 * rank:32 * rank + 32])
        gate, up = (hf_state[f'model.layers.1.mlp.{p}_proj.weight'][64 * rank:64 * rank + 64] for p in ('gate', 'up'))
        assert torch.equal(state['decoder.layers.1.mlp.linear_fc1.weight'], torch.cat([gate, up]))


def test_experts_per_ep_rank_and_the_on_disk_layout():
    """ep=2: rank e holds experts 4e..4e+3 as its local 0..3; the per-expert layout (checkpoints on
    disk) reads back to the same Megatron tensors as the fused one (transformers in memory)."""
    config, hf_state = tiny('qwen3_moe')
    ranks, per_expert = all_ranks(hf_state, config, tp=2, pp=1, ep=2, expert_layout='per_expert')
    assert 'model.layers.0.mlp.experts.7.down_proj.weight' in per_expert
    assert not any('gate_up_proj' in key for key in per_expert)
    fused = hf_state['model.layers.1.mlp.experts.gate_up_proj']
    local = ranks[(0, 1, 1)]['decoder.layers.1.mlp.experts.local_experts.2.linear_fc1.weight']
    gate, up = fused[6].chunk(2)  # ep rank 1, local expert 2 = expert 6; tp rank 1: the second halves
    assert torch.equal(local, torch.cat([gate[32:], up[32:]]))
    for (p, t, e), state in ranks.items():
        again = hf_to_mcore(per_expert, config, tp_rank=t, tp_size=2, ep_rank=e, ep_size=2)
        assert_same_tensors(again, state)


@pytest.mark.parametrize('pp,vp', [(1, 1), (2, 1), (4, 1), (2, 2), (2, 4)])
def test_stage_layers_follow_megatron(pp, vp):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
    config = TransformerConfig(num_layers=8, hidden_size=16, num_attention_heads=2, pipeline_model_parallel_size=pp,
                               virtual_pipeline_model_parallel_size=vp if vp > 1 else None,
                               pipeline_dtype=torch.float32)
    covered = []
    for p, v in itertools.product(range(pp), range(vp)):
        layers = stage_layers(8, pp_rank=p, pp_size=pp, vp_stage=v, vp_size=vp)
        vp_stage = v if vp > 1 else None
        assert layers.start == get_transformer_layer_offset(config, vp_stage, p)
        assert len(layers) == get_num_layers_to_build(config, vp_stage, p)
        covered += list(layers)
    assert sorted(covered) == list(range(8))


def test_transformer_config_carries_the_hf_shapes():
    config, _ = tiny('qwen3_moe')
    megatron = transformer_config(config, tp=2, ep=2, sequence_parallel=True)
    assert (megatron.num_layers, megatron.hidden_size, megatron.num_attention_heads, megatron.num_query_groups,
            megatron.kv_channels, megatron.ffn_hidden_size) == (2, 64, 4, 2, 16, 128)
    assert (megatron.num_moe_experts, megatron.moe_router_topk, megatron.moe_ffn_hidden_size) == (8, 2, 64)
    assert megatron.qk_layernorm and not megatron.add_qkv_bias and not megatron.moe_router_pre_softmax
    assert megatron.layernorm_epsilon == config.rms_norm_eps and megatron.normalization == 'RMSNorm'
    assert megatron.expert_tensor_parallel_size == 2 and megatron.sequence_parallel
    assert transformer_config(Qwen2Config(**SMALL)).add_qkv_bias


@pytest.mark.parametrize('make,match', [
    (lambda c: transformer_config(GPT2Config()), r"model_type 'gpt2'.*supported: llama, qwen2, qwen3, qwen3_moe"),
    (lambda c: transformer_config(c, tp=3), r'tp=3 must divide .*num_attention_heads \(4\)'),
    (lambda c: transformer_config(Qwen3Config(**{**SMALL, 'num_key_value_heads': 1}), tp=2),
     r'tp=2 must divide .*num_key_value_heads \(1\)'),
    (lambda c: transformer_config(c, pp=3), r'pp=3 is larger than .*num_hidden_layers \(2\)'),
    (lambda c: transformer_config(Qwen3Config(**SMALL), pp=3), r'pp=3 x vp=1 must divide .*num_hidden_layers \(4\)'),
    (lambda c: transformer_config(c, ep=2), r'ep=2 needs a mixture-of-experts model'),
    (lambda c: transformer_config(c, tp=0), r'tp must be a positive int, got 0'),
    (lambda c: transformer_config(c, sequence_parallel=True), r'sequence_parallel=True needs tp > 1'),
    (lambda c: transformer_config(Qwen3Config(**SMALL, rope_parameters=dict(rope_type='yarn', factor=4.0,
                                                                            rope_theta=1e6))),
     r'rope_parameters .* not supported'),
    (lambda c: transformer_config(LlamaConfig(**SMALL, attention_bias=True)), r'attention_bias=True is not supported'),
    (lambda c: hf_to_mcore({}, c, tp_rank=2, tp_size=2), r'tp_rank=2 is outside \[0, 2\)'),
    (lambda c: mcore_to_hf({(0, 0): {}}, c, tp_size=2), r'missing \[\(1, 0\)\]'),
    (lambda c: mcore_to_hf({(0, 0): {}}, c, expert_layout='split'), r'expert_layout must be one of fused, per_expert'),
])
def test_bad_input_names_the_argument(make, match):
    config, _ = tiny('qwen3')
    with pytest.raises(ValueError, match=match):
        make(config)


def test_moe_sizes_are_checked_against_the_experts():
    config, _ = tiny('qwen3_moe')
    with pytest.raises(ValueError, match=r'ep=3 must divide .*num_experts \(8\)'):
        transformer_config(config, ep=3)
    assert architecture(config).moe_layers == (True, True)


def test_checkpoint_directory_is_read_lazily(tmp_path):
    path = assets.tiny_model_path('qwen3')
    state = load_hf_state_dict(path)
    from safetensors import safe_open
    with safe_open(f'{path}/model.safetensors', framework='pt') as handle:
        assert sorted(state) == sorted(handle.keys())
        assert torch.equal(state['model.norm.weight'], handle.get_tensor('model.norm.weight'))
    with pytest.raises(FileNotFoundError, match='model_dir'):
        load_hf_state_dict(str(tmp_path))


# --- the GPTModel on gloo ranks ------------------------------------------------------------------

JOBS = {  # name: (model, tp, ep, pp, ranks)
    'qwen3 one process': ('qwen3', 1, 1, 1, 1),
    'qwen3 tp=2 (sequence parallel)': ('qwen3', 2, 1, 1, 2),
    'qwen3 pp=2': ('qwen3', 1, 1, 2, 2),
    'qwen3 tp=2 x pp=2': ('qwen3', 2, 1, 2, 4),
    'qwen3_moe one process': ('qwen3_moe', 1, 1, 1, 1),
    'qwen3_moe ep=2': ('qwen3_moe', 1, 2, 1, 2),
    'qwen3_moe tp=2 (sequence parallel)': ('qwen3_moe', 2, 1, 1, 2),
    'qwen3_moe tp=2 x ep=2': ('qwen3_moe', 2, 2, 1, 4),
}


@pytest.fixture(scope='module')
def job_results(tmp_path_factory):
    """Each job's per-rank results, launched once per module (a failed launch is not retried)."""
    cache = {}

    def run(label):
        if label not in cache:
            model, tp, ep, pp, ranks = JOBS[label]
            out = tmp_path_factory.mktemp(label.split()[0])
            try:
                cache[label] = launch('bridge_logits_job', ranks, out, model, str(tp), str(ep), str(pp))[0]
            except AssertionError as error:
                cache[label] = error
        if isinstance(cache[label], AssertionError):
            raise cache[label]
        return cache[label]
    return run


@pytest.mark.parametrize('label', list(JOBS))
def test_gpt_model_logits_equal_the_hf_model(job_results, label):
    results = job_results(label)
    last_stage = [r for r in results if 'logits' in r]
    assert len(last_stage) == JOBS[label][1] * JOBS[label][2], 'every last-stage rank gathered logits'
    for result in last_stage:
        expected = result['reference_logits']
        assert result['logits'].shape == expected.shape == (2, 16, 151936)
        scale = expected.abs().max().item()
        diff = (result['logits'] - expected).abs().max().item()
        assert diff <= SCALE_RTOL * scale, f'{label}: max |diff| {diff:.3g} vs scale {scale:.3g}'


@pytest.mark.parametrize('label', list(JOBS))
def test_live_model_state_dicts_convert_back_exactly(job_results, label):
    rank0 = job_results(label)[0]
    assert_same_tensors(rank0['restored'], rank0['original'])


def test_tp2_ranks_hold_about_half_the_parameters(job_results):
    one = job_results('qwen3 one process')[0]['parameters']
    halves = [r['parameters'] for r in job_results('qwen3 tp=2 (sequence parallel)')]
    assert all(h <= 0.55 * one for h in halves), (halves, one)


def test_per_expert_file_loads_in_transformers(tmp_path):
    """What save() writes for an MoE model (the per-expert layout) is what from_pretrained reads."""
    from safetensors.torch import save_file
    config, hf_state = tiny('qwen3_moe')
    _, restored = all_ranks(hf_state, config, tp=2, pp=1, ep=2, expert_layout='per_expert')
    save_file(restored, str(tmp_path / 'model.safetensors'), metadata={'format': 'pt'})
    config.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).state_dict()
    original = AutoModelForCausalLM.from_pretrained(assets.tiny_model_path('qwen3_moe'), dtype=torch.float32)
    assert_same_tensors(loaded, original.state_dict())
