"""DPOLoss: value and gradient equal the DPO / cDPO / IPO formulas written out per pair."""
import pytest
import torch
import torch.nn.functional as F

from twinkle.loss import LOSSES, DPOLoss
from twinkle.loss.token_inputs import hand_out, token_inputs

# two prompts, each a (chosen, rejected) pair; completions of 3, 2, 1 and 3 tokens
SAMPLES = [{'labels': [-100, -100, 7, 8, 9]}, {'labels': [-100, 6, 7, -100, -100]},
           {'labels': [-100, -100, -100, 3, -100]}, {'labels': [-100, 2, 4, 1, -100]}]
VOCAB = 13
REF = [[-2.1, -2.4, -2.0], [-2.5, -2.9], [-1.7], [-2.2, -2.6, -2.3]]


def logits_of(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(len(SAMPLES), 5, VOCAB, generator=generator, dtype=torch.float64)).float().requires_grad_()


def loss_and_grad(loss, samples=SAMPLES, ref=REF, micro_batches=((0, 4),)):
    logits = logits_of()
    flat = token_inputs(samples, {'ref_logps': ref})
    total = count = 0
    batches = [{'labels': torch.tensor([s['labels'] for s in samples[a:b]])} for a, b in micro_batches]
    hand_out(flat, batches)
    for batch, (a, b) in zip(batches, micro_batches):
        part_total, part_count = loss(batch, type('Out', (), {'logits': logits[a:b]})())
        total, count = total + part_total, count + part_count
    (total / count).backward()
    return total / count, logits.grad


def completion_logps(logits, i):
    labels = SAMPLES[i]['labels']
    return torch.stack([torch.log_softmax(logits[i, t - 1], -1)[labels[t]] for t in range(1, 5) if labels[t] != -100])


def reference(per_pair):
    logits = logits_of()
    pairs = []
    for k in range(len(SAMPLES) // 2):
        policy = [completion_logps(logits, 2 * k + j) for j in (0, 1)]
        ref = [torch.tensor(REF[2 * k + j]) for j in (0, 1)]
        pairs.append(per_pair(policy, ref))
    value = sum(pairs) / len(pairs)
    value.backward()
    return value, logits.grad


@pytest.mark.parametrize('beta, smoothing', [(0.1, 0.0), (0.5, 0.2)])
def test_sigmoid_equals_dpo_and_cdpo(beta, smoothing):
    def per_pair(policy, ref):
        margin = (policy[0].sum() - policy[1].sum()) - (ref[0].sum() - ref[1].sum())
        return -(1 - smoothing) * F.logsigmoid(beta * margin) - smoothing * F.logsigmoid(-beta * margin)
    value, grad = loss_and_grad(DPOLoss(beta=beta, label_smoothing=smoothing))
    want_value, want_grad = reference(per_pair)
    torch.testing.assert_close(value, want_value, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, want_grad, rtol=1e-6, atol=1e-7)
    assert grad.abs().sum() > 0


def test_ipo_uses_length_averaged_logps():
    beta = 0.3

    def per_pair(policy, ref):
        margin = (policy[0].mean() - policy[1].mean()) - (ref[0].mean() - ref[1].mean())
        return (margin - 1 / (2 * beta)) ** 2
    value, grad = loss_and_grad(DPOLoss(beta=beta, loss_type='ipo'))
    want_value, want_grad = reference(per_pair)
    torch.testing.assert_close(value, want_value, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, want_grad, rtol=1e-6, atol=1e-7)


def test_micro_batches_of_whole_pairs_give_the_same_loss():
    whole = loss_and_grad(DPOLoss(beta=0.2))
    split = loss_and_grad(DPOLoss(beta=0.2), micro_batches=((0, 2), (2, 4)))
    torch.testing.assert_close(split, whole, rtol=1e-6, atol=1e-7)


def test_bad_input_is_named():
    assert LOSSES['DPOLoss'] is DPOLoss
    with pytest.raises(ValueError, match='whole \\(chosen, rejected\\) pairs'):
        loss_and_grad(DPOLoss(), micro_batches=((0, 1), (1, 4)))
    with pytest.raises(ValueError, match='ref_logps'):
        batch = {'labels': torch.tensor([s['labels'] for s in SAMPLES])}
        hand_out(token_inputs(SAMPLES, {}), [batch])
        DPOLoss()(batch, type('Out', (), {'logits': logits_of()})())
    with pytest.raises(ValueError, match='ref_logps\\[1\\] has 1 values'):
        token_inputs(SAMPLES, {'ref_logps': [REF[0], [-1.0], REF[2], REF[3]]})
    for kwargs, name in (({'beta': 0}, 'beta'), ({'label_smoothing': 0.5}, 'label_smoothing'),
                         ({'loss_type': 'hinge'}, 'loss_type'), ({'temperature': 0}, 'temperature')):
        with pytest.raises(ValueError, match=name):
            DPOLoss(**kwargs)


def test_dpo_training_starts_at_log2_and_prefers_the_chosen():
    """Against a reference equal to the initial policy the margin is 0, so the first loss is log 2;
    a few steps then raise the policy's chosen-over-rejected margin."""
    import math

    from twinkle import assets
    from twinkle.model import TransformersModel
    generator = torch.Generator().manual_seed(3)
    samples = []
    for _ in range(2):
        prompt = torch.randint(3, 500, (4,), generator=generator).tolist()
        for _ in ('chosen', 'rejected'):
            completion = torch.randint(3, 500, (3,), generator=generator).tolist()
            samples.append({'input_ids': prompt + completion, 'labels': [-100] * 4 + completion})
    model = TransformersModel(model_id=assets.tiny_model_path('qwen3'), mixed_precision='fp32', kernels=None)

    def logps_now():
        with torch.no_grad():
            rows = []
            for sample in samples:
                logits = model.model(input_ids=torch.tensor([sample['input_ids']])).logits[0].float()
                rows.append([torch.log_softmax(logits[t - 1], -1)[sample['labels'][t]].item() for t in range(4, 7)])
        return rows

    def margin(rows):
        return sum(sum(rows[2 * k]) - sum(rows[2 * k + 1]) for k in range(2))
    ref = logps_now()
    model.set_optimizer('AdamW', lr=1e-3)
    model.set_loss('DPOLoss', beta=0.5)
    losses = []
    for _ in range(4):
        losses.append(model.forward_backward(inputs=samples, ref_logps=ref, micro_batch_size=2)['loss'])
        model.clip_grad_and_step(1.0)
    assert abs(losses[0] - math.log(2)) < 1e-6
    assert losses[-1] < losses[0] - 0.05
    assert margin(logps_now()) > margin(ref) + 0.1
