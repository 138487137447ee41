"""RL losses: value and gradient equal the papers' formulas written out token by token."""
import math

import pytest
import torch

from twinkle.loss import LOSSES, CISPOLoss, GRPOLoss, GSPOLoss
from twinkle.loss.token_inputs import hand_out, token_inputs

# two samples: prompt tokens unlabelled, completions of 3 and 2 tokens
SAMPLES = [{'input_ids': [5, 6, 7, 8, 9], 'labels': [-100, -100, 7, 8, 9]},
           {'input_ids': [5, 6, 7, 0, 0], 'labels': [-100, 6, 7, -100, -100]}]
VOCAB = 11


def batch_and_logits(seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 5, VOCAB, generator=generator, dtype=torch.float64).float().requires_grad_()
    batch = {'labels': torch.tensor([s['labels'] for s in SAMPLES])}
    return batch, logits


def completion_logps(logits):
    """Per sample, the log-probs of its labelled tokens, the way a reader of the paper computes them."""
    rows = []
    for i, sample in enumerate(SAMPLES):
        labels = sample['labels']
        rows.append([torch.log_softmax(logits[i, t - 1], -1)[labels[t]] for t in range(1, 5) if labels[t] != -100])
    return rows


OLD = [[-2.0, -2.6, -1.9], [-2.2, -3.1]]  # chosen so ratios land on both sides of the clip range
ADVANTAGES = [1.5, -0.8]
REF = [[-2.1, -2.4, -2.0], [-2.5, -2.9]]


def run(loss, with_ref=False):
    batch, logits = batch_and_logits()
    inputs = {'old_logps': OLD, 'advantages': ADVANTAGES}
    if with_ref:
        inputs['ref_logps'] = REF
    hand_out(token_inputs(SAMPLES, inputs), [batch])
    total, count = loss(batch, type('Out', (), {'logits': logits})())
    (total / count).backward()
    return total / count, logits.grad, logits


def reference(per_token_fn, normalise):
    _, logits = batch_and_logits()
    per_sequence = [[per_token_fn(lp, OLD[i][t], ADVANTAGES[i]) for t, lp in enumerate(logps)]
                    for i, logps in enumerate(completion_logps(logits))]
    value = normalise(per_sequence)
    value.backward()
    return value, logits.grad


def clipped(eps_low, eps_high):
    def per_token(logp, old, advantage):
        ratio = torch.exp(logp - old)
        return -torch.minimum(ratio * advantage, ratio.clamp(1 - eps_low, 1 + eps_high) * advantage)
    return per_token


def sequence_mean(per_sequence):
    return sum(sum(terms) / len(terms) for terms in per_sequence) / len(per_sequence)


def token_mean(per_sequence):
    return sum(sum(terms) for terms in per_sequence) / sum(len(terms) for terms in per_sequence)


@pytest.mark.parametrize('loss_type, normalise', [
    ('grpo', sequence_mean), ('bnpo', token_mean), ('dapo', token_mean),
    ('dr_grpo', lambda seqs: sum(sum(t) for t in seqs) / (len(seqs) * 4))])
def test_grpo_loss_types_equal_the_formula(loss_type, normalise):
    loss = GRPOLoss(epsilon=0.2, epsilon_high=0.28, loss_type=loss_type, max_completion_length=4)
    value, grad, logits = run(loss)
    want_value, want_grad = reference(clipped(0.2, 0.28), normalise)
    torch.testing.assert_close(value, want_value, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, want_grad, rtol=1e-6, atol=1e-7)
    ratios = torch.tensor([lp.item() - o for row, olds in zip(completion_logps(logits.detach()), OLD)
                           for lp, o in zip(row, olds)]).exp()
    assert (ratios > 1.28).any() and (ratios < 0.8).any()  # both clip sides are exercised


def test_grpo_with_a_reference_model_adds_beta_k3():
    value, grad, _ = run(GRPOLoss(epsilon=0.2, beta=0.05), with_ref=True)
    _, logits = batch_and_logits()
    per_sequence = []
    for i, logps in enumerate(completion_logps(logits)):
        per_sequence.append([clipped(0.2, 0.2)(lp, OLD[i][t], ADVANTAGES[i])
                             + 0.05 * (torch.exp(REF[i][t] - lp) - (REF[i][t] - lp) - 1) for t, lp in enumerate(logps)])
    want = sequence_mean(per_sequence)
    want.backward()
    torch.testing.assert_close(value, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, logits.grad, rtol=1e-6, atol=1e-7)


def test_gspo_clips_the_sequence_ratio():
    value, grad, _ = run(GSPOLoss(epsilon=0.1, epsilon_high=0.15))
    _, logits = batch_and_logits()
    terms = []
    for i, logps in enumerate(completion_logps(logits)):
        ratio = torch.exp(sum(lp - o for lp, o in zip(logps, OLD[i])) / len(logps))
        a = ADVANTAGES[i]
        terms.append(-torch.minimum(ratio * a, ratio.clamp(0.9, 1.15) * a))
    want = sum(terms) / len(terms)
    want.backward()
    torch.testing.assert_close(value, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, logits.grad, rtol=1e-6, atol=1e-7)


def test_cispo_weights_reinforce_by_the_detached_clipped_ratio():
    value, grad, _ = run(CISPOLoss(epsilon_high=0.28))
    want, want_grad = reference(
        lambda lp, old, a: -torch.exp(lp - old).clamp(0.0, 1.28).detach() * a * lp, token_mean)
    torch.testing.assert_close(value, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, want_grad, rtol=1e-6, atol=1e-7)


def test_without_old_logps_the_step_is_on_policy():
    batch, logits = batch_and_logits()
    hand_out(token_inputs(SAMPLES, {'advantages': ADVANTAGES}), [batch])
    total, count = GRPOLoss()(batch, type('Out', (), {'logits': logits})())
    assert total.item() == pytest.approx(-(1.5 - 0.8))  # ratio 1: -mean A per sequence, summed


def test_selectable_by_name_and_bad_input_is_named():
    assert LOSSES['GRPOLoss'] is GRPOLoss and LOSSES['GSPOLoss'] is GSPOLoss and LOSSES['CISPOLoss'] is CISPOLoss
    batch, logits = batch_and_logits()
    with pytest.raises(ValueError, match='needs advantages='):
        GRPOLoss()(batch, type('Out', (), {'logits': logits})())
    hand_out(token_inputs(SAMPLES, {'advantages': ADVANTAGES}), [batch])
    with pytest.raises(ValueError, match='needs ref_logps='):
        GRPOLoss(beta=0.1)(batch, type('Out', (), {'logits': logits})())
    with pytest.raises(ValueError, match=r'old_logps\[1\] has 3 values for the 2 trained tokens of sample 1'):
        token_inputs(SAMPLES, {'old_logps': [[0.0] * 3, [0.0] * 3], 'advantages': ADVANTAGES})
    with pytest.raises(ValueError, match='advantages has 1 entries for 2 samples'):
        token_inputs(SAMPLES, {'advantages': [1.0]})
    with pytest.raises(ValueError, match='unknown loss inputs'):
        token_inputs(SAMPLES, {'rewards': [1.0, 2.0]})
    with pytest.raises(ValueError, match='loss_type must be one of'):
        GRPOLoss(loss_type='ppo')
    with pytest.raises(ValueError, match='max_completion_length'):
        GRPOLoss(loss_type='dr_grpo')
    with pytest.raises(ValueError, match='epsilon must be'):
        GRPOLoss(epsilon=-1)


def test_model_gradients_do_not_depend_on_micro_batches_and_equal_the_hand_loss():
    from twinkle import assets
    from twinkle.model import TransformersModel
    generator = torch.Generator().manual_seed(1)
    samples, old, advantages = [], [], []
    for i in range(4):
        prompt = torch.randint(3, 500, (3 + i,), generator=generator).tolist()
        completion = torch.randint(3, 500, (2 + i % 3,), generator=generator).tolist()
        samples.append({'input_ids': prompt + completion, 'labels': [-100] * len(prompt) + completion})
        old.append((-6 - torch.rand(len(completion), generator=generator)).tolist())
        advantages.append([1.0, -0.5, 0.25, -1.0][i])
    grads = {}
    for name, micro_batch_size, kernels in (('whole', None, 'auto'), ('micro', 2, 'auto'), ('eager', 2, None)):
        model = TransformersModel(model_id=assets.tiny_model_path('qwen3'), mixed_precision='fp32', kernels=kernels)
        model.set_loss('GRPOLoss', epsilon=0.2)
        model.forward_backward(inputs=samples, old_logps=old, advantages=advantages,
                               micro_batch_size=micro_batch_size)
        model.clip_grad_norm(1e9)  # finalises (token-normalises) the accumulated gradients
        grads[name] = {n: p.grad.clone() for n, p in model.model.named_parameters() if p.grad is not None}
    # by hand: the same model, its own log_softmax, GRPO's sequence-mean of clipped surrogates
    model = TransformersModel(model_id=assets.tiny_model_path('qwen3'), mixed_precision='fp32', kernels=None)
    total = 0.0
    for sample, olds, advantage in zip(samples, old, advantages):
        logits = model.model(input_ids=torch.tensor([sample['input_ids']])).logits[0]
        start = sample['labels'].index(next(t for t in sample['labels'] if t != -100))
        terms = []
        for t, o in zip(range(start, len(sample['labels'])), olds):
            ratio = torch.exp(torch.log_softmax(logits[t - 1], -1)[sample['labels'][t]] - o)
            terms.append(-torch.minimum(ratio * advantage, ratio.clamp(0.8, 1.2) * advantage))
        total = total + sum(terms) / len(terms)
    (total / len(samples)).backward()
    want = {n: p.grad for n, p in model.model.named_parameters() if p.grad is not None}
    assert len(want) > 10
    for name, grad in want.items():
        scale = grad.abs().max().clamp(min=1e-12)
        for run_name in grads:
            assert (grads[run_name][name] - grad).abs().max() <= 1e-5 * scale, (run_name, name)


def test_kernelized_model_hands_the_losses_fused_logps_instead_of_logits():
    """kernels='auto': the policy and preference losses read ``outputs.logps`` (fused linear log-probs,
    no [tokens, vocab] logits), equal to log_softmax of the stock logits at the trained tokens."""
    from twinkle import assets
    from twinkle.model import TransformersModel
    from twinkle.loss import DPOLoss
    samples = [{'input_ids': [5, 9, 11, 40, 41, 42], 'labels': [-100, -100, -100, 40, 41, 42]},
               {'input_ids': [5, 9, 12, 43, 44], 'labels': [-100, -100, -100, 43, 44]}]
    seen = {}

    class SpiedDPO(DPOLoss):
        def __call__(self, inputs, outputs):
            seen[self.kernels] = (getattr(outputs, 'logps', None), outputs.logits)
            return super().__call__(inputs, outputs)

    for kernels in ('auto', None):
        model = TransformersModel(model_id=assets.tiny_model_path('qwen3'), mixed_precision='fp32', kernels=kernels)
        loss = SpiedDPO(beta=0.5)
        loss.kernels = kernels
        model.set_loss(loss)
        model.forward_backward(inputs=samples, ref_logps=[[-7.0, -7.0, -7.0], [-7.0, -7.0]])
    fused, no_logits = seen['auto']
    assert no_logits is None and fused is not None and fused.shape == (2, 6)
    stock_logps, logits = seen[None]
    assert stock_logps is None
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    targets = torch.tensor([[0, 0, 40, 41, 42, 0], [0, 0, 43, 44, 0, 0]])
    want = logits.float().log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    assert torch.allclose(fused[mask], want[mask], rtol=0, atol=1e-5 * float(want.abs().max()))
    assert (fused[~mask] == 0).all()
