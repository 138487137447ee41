"""Rewards on handwritten completions."""
import pytest

from twinkle.reward import CountdownReward, FormatReward, GSM8KAccuracyReward, GSM8KFormatReward


def trajectory(completion, **user_data):
    return {'messages': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': completion}],
            'user_data': [user_data]}


def test_gsm8k_accuracy_reads_the_marked_or_last_number():
    cases = [('so 3 + 4 = 7\n#### 7', 1.0), ('it is 1,234.', 1.0), ('#### 12 and later 7', 0.0), ('no idea', 0.0),
             ('#### -2', 0.0)]
    truths = ['7', '1234', '7', '7', '2']
    got = GSM8KAccuracyReward()([trajectory(text, ground_truth=t) for (text, _), t in zip(cases, truths)])
    assert got == [want for _, want in cases]
    assert GSM8KAccuracyReward()([trajectory('#### 5')], ground_truths=[5]) == [1.0]


def test_gsm8k_format_wants_the_final_marked_number():
    got = GSM8KFormatReward()([trajectory(t) for t in ('work\n#### 42', '#### 42 because', '42', '####  -3.5 ')])
    assert got == [1.0, 0.0, 0.0, 1.0]


def test_format_reward_wants_every_tag_in_order_and_nothing_else():
    texts = ['<think>a</think><answer>b</answer>', ' <think>a\nb</think>\n<answer>c</answer> ',
             '<answer>b</answer><think>a</think>', '<think></think><answer>b</answer>', 'x<think>a</think><answer>b</answer>',
             '<think>a</think>']
    assert FormatReward()([trajectory(t) for t in texts]) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert FormatReward(tags=['answer'])([trajectory('<answer>1</answer>')]) == [1.0]


def test_countdown_checks_numbers_and_value_without_eval():
    facts = {'target': 9, 'nums': [1, 2, 3]}
    texts = ['<answer>(1 + 2) * 3</answer>', '<answer>3 * 3</answer>', '<answer>(1 + 2) * 3 + 0</answer>',
             '<answer>1 + 2 + 3</answer>', '<answer>__import__("os")</answer>', '<answer>3 / (2 - 2) + 1</answer>',
             'no tag']
    assert CountdownReward()([trajectory(t, **facts) for t in texts]) == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize('call, match', [
    (lambda: GSM8KAccuracyReward()([trajectory('1')], ground_truths=[1, 2]), 'ground_truths has 2 entries for 1'),
    (lambda: GSM8KAccuracyReward()([trajectory('1')]), "user_data\\[0\\]\\['ground_truth'\\]"),
    (lambda: CountdownReward()([trajectory('1', target=3)]), "'nums'"),
    (lambda: GSM8KFormatReward()([{'messages': [{'role': 'user', 'content': 'q'}]}]), 'not the assistant'),
    (lambda: GSM8KFormatReward()([{}]), 'trajectories\\[0\\] has no messages'),
    (lambda: FormatReward(tags='think'), 'tags must be'),
])
def test_bad_input_is_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_empty_ground_truths_read_user_data_as_the_seeds_client_calls():
    assert FormatReward()([trajectory('<think>a</think><answer>b</answer>')], []) == [1.0]
    assert GSM8KAccuracyReward()([trajectory('#### 5', ground_truth='5')], []) == [1.0]


def test_completion_reward_metric_means_as_the_seeds_use_it():
    from twinkle.metric import CompletionRewardMetric
    metric = CompletionRewardMetric()
    metric.accumulate(completion_lengths=[4, 6], rewards={'total': [1.0, 0.0], 'format': [1.0, 1.0]})
    metric.accumulate(completion_lengths=[8], rewards={'total': [2.0], 'format': [0.0]})
    got = metric.calculate()
    assert got['completion_length/mean'] == 6.0 and got['completion_length/max'] == 8.0
    assert got['reward/total/mean'] == 1.0 and got['reward/total/std'] == 1.0
    assert got['reward/format/mean'] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="rewards\\['total'\\] has 1 values for 2 completion_lengths"):
        metric.accumulate(completion_lengths=[1, 2], rewards={'total': [1.0]})
    metric.reset()
    assert metric.calculate() == {}
