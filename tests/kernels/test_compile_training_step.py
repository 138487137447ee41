"""A kernelized tiny Qwen3 and Qwen3-MoE training step compiles as one graph (``fullgraph=True``):
every twinkle op is a registered torch op, so dynamo sees each as one node, and nothing around
them (the fused loss's hidden-state capture, the MoE experts, varlen attention on a packed batch)
breaks the graph. The compiled step's fp32 loss and gradients equal eager's.

``loss.backward()`` runs outside the compiled function (dynamo does not trace ``.backward()``);
AOTAutograd compiles the backward graph together with the forward, which is what a training loop
compiling its model gets. ``aot_eager`` runs those graphs without Inductor's code generation,
which changes nothing about graph breaks and keeps this test fast on 2 cores.
"""
import pytest
import torch

from tests.kernels.test_sync_free import packed_batch, tiny

INPUTS = ('input_ids', 'position_ids', 'cu_seq_lens_q', 'cu_seq_lens_k', 'max_length_q', 'max_length_k')


def training_step(model):
    def step(labels, **inputs):
        return model(**inputs, labels=labels, num_items_in_batch=1).loss
    return step


def loss_and_grads(step, model, batch):
    model.zero_grad(set_to_none=True)
    loss = step(batch['labels'], **{key: batch[key] for key in INPUTS})
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
@pytest.mark.parametrize('moe', [False, True], ids=['qwen3', 'qwen3_moe'])
def test_training_step_compiles_as_one_graph_with_eager_loss_and_gradients(moe):
    torch._dynamo.reset()
    model = tiny(moe, layers=2)
    batch = packed_batch()
    step = training_step(model)
    eager_loss, eager_grads = loss_and_grads(step, model, batch)  # the registry chooses outside any graph

    explanation = torch._dynamo.explain(step)(batch['labels'], **{key: batch[key] for key in INPUTS})
    reasons = [reason.reason.splitlines()[0] for reason in explanation.break_reasons]
    assert explanation.graph_break_count == 0, reasons
    assert explanation.graph_count == 1

    compiled = torch.compile(step, fullgraph=True, backend='aot_eager')
    compiled_loss, compiled_grads = loss_and_grads(compiled, model, batch)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=0)
    assert compiled_grads.keys() == eager_grads.keys() and len(eager_grads) > 10
    for name, grad in eager_grads.items():
        scale = grad.abs().max().clamp(min=1e-12)
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-5 * float(scale), msg=name)
