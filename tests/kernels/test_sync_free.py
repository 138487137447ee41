"""No host-device synchronisation per layer: a forward+backward of the kernelized tiny Qwen3 and
Qwen3-MoE on a packed batch reads tensor values to the host a constant number of times per step,
whatever the number of layers.

On a GPU each read of a tensor's value (``.item()``, ``.tolist()``, ``bool(t)``, ``int(t)``, a
boolean-mask index, ``nonzero``) stalls the stream until the device has caught up. This CPU test
counts those Python-level calls by patching them on ``torch.Tensor``, runs the model with 2 and
with 4 layers, and asserts the counts are equal: zero per layer. (``gpu-check`` repeats this on a
GPU under ``torch.cuda.set_sync_debug_mode``, which also sees syncs inside C++ ops.)

Backends: those the registry picks here, except ``grouped_experts``, forced to ``grouped_mm``,
the backend CUDA picks; the CPU-only per-expert GEMM loop reads its group bounds from host memory,
which is no sync on a CPU and never runs on a GPU.
"""
import collections
import contextlib
import sys
import traceback
import warnings

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from tests.conftest import DEVICE
from twinkle import kernels
from twinkle.kernels.varlen_attention import register_hf_attention
from twinkle.processor import InputProcessor

SYNCING = ('item', 'tolist', '__bool__', '__int__', '__float__', '__index__', 'nonzero', 'cpu', 'numpy')


def tiny(moe: bool, layers: int):
    torch.manual_seed(0)
    common = dict(vocab_size=256, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8)
    if moe:
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=16, num_experts=4,
                                                   num_experts_per_tok=2, **common))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(intermediate_size=48, **common))
    model.set_attn_implementation(register_hf_attention())
    return kernels.kernelize(model.to(DEVICE))


def packed_batch():
    generator = torch.Generator().manual_seed(1)
    features = [{'input_ids': torch.randint(0, 256, (n,), generator=generator).tolist()} for n in (7, 12, 5)]
    for feature in features:
        feature['labels'] = feature['input_ids']
    batch, = InputProcessor(padding_free=True).micro_batches(features)
    return batch


class SyncCounter:
    """Counts the calls of the syncing Tensor methods, with the line of twinkle/transformers that made them."""

    def __init__(self, monkeypatch):
        self.calls = collections.Counter()
        self.active = False
        for name in SYNCING:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name), name))

    def _wrap(self, original, name):
        def counted(tensor, *args, **kwargs):
            if self.active:
                self.active = False  # calls made by the counted call itself are not counted again
                try:
                    frame = next((f for f in reversed(traceback.extract_stack()[:-1])
                                  if 'site-packages/torch/' not in f.filename), None)
                    self.calls[f'{name} at {frame.filename.rsplit("/", 2)[-1]}:{frame.lineno}'] += 1
                finally:
                    self.active = True
            return original(tensor, *args, **kwargs)
        return counted

    def step(self, model, batch) -> collections.Counter:
        self.calls.clear()
        inputs = {key: batch[key] for key in ('input_ids', 'position_ids', 'cu_seq_lens_q', 'cu_seq_lens_k',
                                              'max_length_q', 'max_length_k', 'labels')}
        inputs = {key: value.to(DEVICE) if torch.is_tensor(value) else value for key, value in inputs.items()}
        self.active = True
        try:
            with self._device_syncs():
                out = model(**inputs, num_items_in_batch=1)
                out.loss.backward()
        finally:
            self.active = False
        return collections.Counter(self.calls)

    @contextlib.contextmanager
    def _device_syncs(self):
        """On a GPU, also the syncs inside C++ ops, as torch.cuda's sync debug mode reports them."""
        if DEVICE.type != 'cuda':
            yield
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            torch.cuda.set_sync_debug_mode('warn')
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode('default')
        for warning in caught:
            if 'synchronizing' in str(warning.message):
                where = '/'.join(warning.filename.rsplit('/', 2)[-2:])
                self.calls[f'device sync at {where}:{warning.lineno}'] += 1


@pytest.mark.parametrize('moe', [False, True], ids=['qwen3', 'qwen3_moe'])
def test_no_host_sync_per_layer(moe, monkeypatch, fresh_registry):
    monkeypatch.delenv('TWINKLE_CHECK_VALUES', raising=False)
    kernels.configure(grouped_experts='grouped_mm')
    batch = packed_batch()
    models = {layers: tiny(moe, layers) for layers in (2, 4)}
    counter = SyncCounter(monkeypatch)
    counts = {layers: counter.step(model, batch) for layers, model in models.items()}
    print(f'\nsyncs per step ({"qwen3_moe" if moe else "qwen3"}):', dict(counts[2]), file=sys.stderr)
    assert counts[4] == counts[2], f'syncs grow with the layers: 2 layers {dict(counts[2])}, 4 layers {dict(counts[4])}'
    # What is left is per step (the loss drops ignored tokens: their count sizes its rows); nothing of
    # the attention, norm, MLP, RoPE or MoE ops.
    assert not [call for call in counts[2] if 'varlen_attention' in call or 'moe' in call], dict(counts[2])


# -- Bad input: the values the ops no longer read per call are checked where the batch is built ----

@pytest.mark.parametrize('change, message', [
    (lambda b: b['input_ids'].__setitem__((0, 3), 256), r'input_ids: ids must be in \[0, 256\); found 256'),
    (lambda b: b['labels'].__setitem__((0, 3), 999), r'labels: ids must be in \[0, 256\) or equal -100'),
    (lambda b: b.update(cu_seq_lens_q=torch.tensor([0, 12, 7, 24], dtype=torch.int32)), 'cu_seq_lens_q must rise'),
    (lambda b: b.update(max_length_q=3), 'max_length_q=3 is shorter'),
])
def test_bad_batch_values_fail_where_the_batch_is_built(change, message):
    from twinkle.model.transformers.batches import to_batches
    batch = packed_batch()
    change(batch)
    with pytest.raises(ValueError, match=message):
        to_batches(batch, None, None, torch.device('cpu'), vocab_size=256)


def test_good_batch_passes_the_batch_checks():
    from twinkle.model.transformers.batches import to_batches
    batch, = to_batches(packed_batch(), None, None, torch.device('cpu'), vocab_size=256)
    assert batch['max_length_q'] == 12
