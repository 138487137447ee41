"""GRPO, the seeds' RL example, in one process on the embedded tiny Qwen3 and a shipped GSM8K-style set.

    python examples/grpo.py                    # 5 steps, GSM8K accuracy + format rewards
    python examples/grpo.py --reward toy --steps 30 --plot grpo.png   # a reward the tiny model can learn
    make train JOB=grpo

The seeds' loop with one substitution: ``TorchSampler`` where they say ``vLLMSampler`` (vLLM is not
installed here). Each step: sync the LoRA weights into the sampler, sample ``--num-generations``
completions per prompt, score them, GRPO advantages, one optimizer step per mini-batch. The tiny
model's weights are random, so GSM8K rewards stay 0 (advantages 0); ``--reward toy`` scores the
share of completion tokens whose id is below 30,000 (about 20 % of the vocabulary), a
verifiable reward with signal from the first step.
"""
import argparse
from typing import List

import twinkle
from peft import LoraConfig
from twinkle import assets
from twinkle.advantage import GRPOAdvantage
from twinkle.checkpoint_engine import CheckpointEngineManager
from twinkle.data_format import SamplingParams
from twinkle.dataloader import DataLoader
from twinkle.dataset import Dataset, DatasetMeta
from twinkle.metric import CompletionRewardMetric
from twinkle.model import TransformersModel
from twinkle.preprocessor import GSM8KProcessor
from twinkle.reward import GSM8KAccuracyReward, GSM8KFormatReward, Reward
from twinkle.sampler import TorchSampler


class TargetTokensReward(Reward):
    """Share of the completion's tokens whose id is below ``limit``: learnable by a random model."""

    def __init__(self, limit: int = 30000):
        self.limit = limit

    def __call__(self, trajectories, ground_truths=None) -> List[float]:
        scores = []
        for feature in trajectories:
            completion = [t for t, label in zip(feature['input_ids'], feature['labels']) if label != -100]
            scores.append(sum(t < self.limit for t in completion) / max(len(completion), 1))
        return scores


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--reward', choices=('gsm8k', 'toy'), default='gsm8k')
    parser.add_argument('--batch-size', type=int, default=4, help='prompts per step')
    parser.add_argument('--num-generations', type=int, default=4)
    parser.add_argument('--max-new-tokens', type=int, default=8)
    parser.add_argument('--mini-batch-size', type=int, default=8, help='completions per optimizer step')
    parser.add_argument('--micro-batch-size', type=int, default=4)
    parser.add_argument('--lr', type=float, default=5e-3)
    parser.add_argument('--full', action='store_true', help='train every weight (and sync them all) instead of LoRA')
    parser.add_argument('--plot', default=None, help='draw the mean reward per step to this PNG')
    return parser.parse_args()


def create_dataset(model_id):
    dataset = Dataset(DatasetMeta(assets.gsm8k_path()))
    dataset.set_template('Qwen3_5Template', model_id=model_id, max_length=256)
    dataset.map(GSM8KProcessor())
    dataset.encode(add_generation_prompt=True)
    return dataset


def main():
    args = parse_args()
    twinkle.initialize(seed=0)
    model_id = assets.tiny_model_path('qwen3')
    model = TransformersModel(model_id=model_id, mixed_precision='fp32')
    if not args.full:
        model.add_adapter_to_model('default', LoraConfig(target_modules='all-linear', r=8, lora_alpha=32))
    model.set_optimizer('AdamW', lr=args.lr)
    model.set_loss('GRPOLoss', epsilon=0.2)
    model.set_template('Qwen3_5Template', model_id=model_id)
    sampler = TorchSampler(model_id)
    sampler.set_template('Qwen3_5Template', model_id=model_id)
    ckpt_manager = CheckpointEngineManager(model=model, sampler=sampler)
    rewards_fn = [TargetTokensReward()] if args.reward == 'toy' else [GSM8KAccuracyReward(), GSM8KFormatReward()]
    advantage_fn, metrics = GRPOAdvantage(), CompletionRewardMetric()
    sampling_params = SamplingParams(max_tokens=args.max_new_tokens, num_samples=args.num_generations, logprobs=1)
    curve, step = [], 0
    while step < args.steps:
        for batch in DataLoader(dataset=create_dataset(model_id), batch_size=args.batch_size):
            if step >= args.steps:
                break
            metrics.reset()
            ckpt_manager.sync_weights(merge_and_sync=False)
            sampler.reset_prefix_cache()
            responses = sampler.sample(batch, sampling_params, adapter_name=None if args.full else 'default')
            inputs, old_logps, lengths = [], [], []
            for response in responses:  # prompt-major: each prompt's num_generations completions together
                for sequence in response.sequences:
                    inputs.append(sequence.new_input_feature)
                    old_logps.append([logprob[0][1] for logprob in sequence.logprobs])
                    lengths.append(len(sequence.tokens))
            per_reward = [fn(inputs) for fn in rewards_fn]
            total = [sum(values) for values in zip(*per_reward)]
            metrics.accumulate(completion_lengths=lengths, rewards={'total': total})
            advantages = advantage_fn(total, num_generations=args.num_generations, scale='group').tolist()
            for start in range(0, len(inputs), args.mini_batch_size):
                end = start + args.mini_batch_size
                model.forward_backward(inputs=inputs[start:end], old_logps=old_logps[start:end],
                                       advantages=advantages[start:end], micro_batch_size=args.micro_batch_size)
                model.clip_grad_and_step()
            step += 1
            log = metrics.calculate()
            log.update(model.calculate_metric(is_training=True))
            curve.append(log['reward/total/mean'])
            print(f'[Step {step}/{args.steps}] reward {log["reward/total/mean"]:.4f} '
                  f'loss {log.get("loss", float("nan")):.4f} completion_length {log["completion_length/mean"]:.1f}')
    if args.plot:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        plt.figure(figsize=(6, 3.5))
        plt.plot(range(1, len(curve) + 1), curve, marker='o')
        plt.xlabel('step')
        plt.ylabel(f'mean reward ({args.reward})')
        plt.title('GRPO on the tiny Qwen3 (TorchSampler, CPU)')
        plt.tight_layout()
        plt.savefig(args.plot)
    print('rewards per step: ' + ', '.join(f'{value:.4f}' for value in curve))


if __name__ == '__main__':
    main()
