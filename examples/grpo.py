"""GRPO, the seeds' RL example, on the embedded tiny Qwen3 and a shipped GSM8K-style set.

    python examples/grpo.py                    # 5 steps, GSM8K accuracy + format rewards, one process
    python examples/grpo.py --reward toy --steps 30 --plot grpo.png   # a reward the tiny model can learn
    torchrun --nproc_per_node=2 examples/grpo.py   # rank 0 trains, rank 1 samples (worlds of their own)
    make train JOB=grpo                        # NPROC=2: the torchrun form

Under torchrun the ranks split into a model role and a sampler role (``--sampler-ranks``, default
1; ``twinkle.parallel.roles``): the model's ranks are the training world (FSDP over them when
more than one), weights go to the samplers through ``ProcessGroupCheckpointEngine`` and the
rollouts (inputs, old log-probs, advantages) come back over an ``ObjectChannel``; every wait
between the roles is bounded by ``--timeout``.

The seeds' loop with one substitution: ``TorchSampler`` where they say ``vLLMSampler`` (vLLM is not
installed here). Each step: sync the LoRA weights into the sampler, sample ``--num-generations``
completions per prompt, score them, GRPO advantages, one optimizer step per mini-batch. The tiny
model's weights are random, so GSM8K rewards stay 0 (advantages 0); ``--reward toy`` scores the
share of completion tokens with an even id, sampled among each position's ``--top-k`` (default 8
for it) most likely tokens: a verifiable reward with signal from the first step (about 0.5) that
the model controls by re-ranking its few candidates. (A share of the whole 151,936-token
vocabulary stayed flat over 30 steps: a random model's near-uniform distribution gives each
sampled token's gradient almost no effect on the set.)
"""
import argparse
import os
from typing import List

import twinkle
from peft import LoraConfig
from twinkle import assets
from twinkle.advantage import GRPOAdvantage
from twinkle.checkpoint_engine import CheckpointEngineManager, ProcessGroupCheckpointEngine
from twinkle.data_format import SamplingParams
from twinkle.dataloader import DataLoader
from twinkle.dataset import Dataset, DatasetMeta
from twinkle.metric import CompletionRewardMetric
from twinkle.model import TransformersModel
from twinkle.parallel.roles import ObjectChannel, split_torchrun
from twinkle.preprocessor import GSM8KProcessor
from twinkle.reward import GSM8KAccuracyReward, GSM8KFormatReward, Reward
from twinkle.sampler import TorchSampler


class EvenTokensReward(Reward):
    """Share of the completion's tokens with an even id: learnable by a random model under top-k."""

    def __call__(self, trajectories, ground_truths=None) -> List[float]:
        scores = []
        for feature in trajectories:
            completion = [t for t, label in zip(feature['input_ids'], feature['labels']) if label != -100]
            scores.append(sum(t % 2 == 0 for t in completion) / max(len(completion), 1))
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
    parser.add_argument('--lr', type=float, default=None, help='default 5e-3; 2e-2 with --reward toy')
    parser.add_argument('--top-k', type=int, default=None, help='sample among the k likeliest tokens (toy: 8)')
    parser.add_argument('--full', action='store_true', help='train every weight (and sync them all) instead of LoRA')
    parser.add_argument('--plot', default=None, help='draw the mean reward per step to this PNG')
    parser.add_argument('--sampler-ranks', type=int, default=1, help='under torchrun: ranks that sample')
    parser.add_argument('--timeout', type=float, default=300.0, help='seconds any wait between the roles may take')
    args = parser.parse_args()
    if args.lr is None:
        args.lr = 2e-2 if args.reward == 'toy' else 5e-3
    return args


def create_dataset(model_id):
    dataset = Dataset(DatasetMeta(assets.gsm8k_path()))
    dataset.set_template('Qwen3_5Template', model_id=model_id, max_length=256)
    dataset.map(GSM8KProcessor())
    dataset.encode(add_generation_prompt=True)
    return dataset


def build_model(args, model_id, **placement):
    """``placement``: ``device_mesh=`` / ``remote_group=`` (examples/ray_grpo.py)."""
    model = TransformersModel(model_id=model_id, mixed_precision='fp32', **placement)
    if not args.full:
        model.add_adapter_to_model('default', LoraConfig(target_modules='all-linear', r=8, lora_alpha=32))
    model.set_optimizer('AdamW', lr=args.lr)
    model.set_loss('GRPOLoss', epsilon=0.2)
    model.set_template('Qwen3_5Template', model_id=model_id)
    return model


def build_sampler(model_id, **placement):
    sampler = TorchSampler(model_id, **placement)
    sampler.set_template('Qwen3_5Template', model_id=model_id)
    return sampler


def rollout(args, sampler, batch):
    """Sample, score and compute advantages: what one training step consumes."""
    rewards_fn = [EvenTokensReward()] if args.reward == 'toy' else [GSM8KAccuracyReward(), GSM8KFormatReward()]
    top_k = args.top_k if args.top_k is not None else 8 if args.reward == 'toy' else None
    sampling_params = SamplingParams(max_tokens=args.max_new_tokens, num_samples=args.num_generations, logprobs=1,
                                     top_k=top_k)
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
    advantages = GRPOAdvantage()(total, num_generations=args.num_generations, scale='group').tolist()
    return {'inputs': inputs, 'old_logps': old_logps, 'advantages': advantages, 'lengths': lengths,
            'rewards': total}


def train_on(args, model, rollout_result, step, data_rank=0, data_ranks=1):
    """One step: an optimizer step per ``--mini-batch-size`` completions of the rollout, each data rank
    training its slice of every mini-batch; the reward metrics are the whole rollout's."""
    metrics = CompletionRewardMetric()
    metrics.accumulate(completion_lengths=rollout_result['lengths'], rewards={'total': rollout_result['rewards']})
    inputs, old_logps, advantages = (rollout_result[key] for key in ('inputs', 'old_logps', 'advantages'))
    for start in range(0, len(inputs), args.mini_batch_size):
        size = min(args.mini_batch_size, len(inputs) - start)
        if size % data_ranks:
            raise ValueError(f'a mini-batch of {size} completions does not split over {data_ranks} model ranks')
        mine = slice(start + data_rank * size // data_ranks, start + (data_rank + 1) * size // data_ranks)
        model.forward_backward(inputs=inputs[mine], old_logps=old_logps[mine], advantages=advantages[mine],
                               micro_batch_size=args.micro_batch_size)
        model.clip_grad_and_step()
    log = metrics.calculate()
    log.update(model.calculate_metric(is_training=True))
    if data_rank == 0:
        print(f'[Step {step}/{args.steps}] reward {log["reward/total/mean"]:.4f} '
              f'loss {log.get("loss", float("nan")):.4f} completion_length {log["completion_length/mean"]:.1f}',
              flush=True)
    return log['reward/total/mean']


def prompt_batches(args, model_id):
    """``args.steps`` batches of prompts, cycling over the dataset: the same on every role."""
    step = 0
    while step < args.steps:
        for batch in DataLoader(dataset=create_dataset(model_id), batch_size=args.batch_size):
            if step >= args.steps:
                return
            step += 1
            yield step, batch


def run_in_one_process(args, model_id):
    model, sampler = build_model(args, model_id), build_sampler(model_id)
    ckpt_manager = CheckpointEngineManager(model=model, sampler=sampler)
    curve = []
    for step, batch in prompt_batches(args, model_id):
        ckpt_manager.sync_weights(merge_and_sync=False)
        curve.append(train_on(args, model, rollout(args, sampler, batch), step))
    return curve


def run_as_roles(args, model_id):
    """torchrun: model ranks first, then ``--sampler-ranks`` sampler ranks, each role its own world."""
    job_size = int(os.environ['WORLD_SIZE'])
    if not 1 <= args.sampler_ranks < job_size:
        raise ValueError(f'--sampler-ranks must leave at least one model rank of WORLD_SIZE={job_size}, '
                         f'got {args.sampler_ranks}')
    role = split_torchrun({'model': job_size - args.sampler_ranks, 'sampler': args.sampler_ranks})
    twinkle.initialize(seed=0)
    in_sync_group = role.name == 'sampler' or role.rank == 0  # the model's first rank sends to every sampler
    engine = (ProcessGroupCheckpointEngine(rank=0 if role.name == 'model' else 1 + role.rank,
                                           world_size=1 + args.sampler_ranks, host=role.host, port=role.port(0),
                                           timeout=args.timeout) if in_sync_group else None)
    channel = ObjectChannel(role.host, role.port(1), is_host=role.job_rank == 0, world_size=role.job_size,
                            timeout=args.timeout)
    curve = []
    if role.name == 'model':
        model = build_model(args, model_id)
        ckpt_manager = CheckpointEngineManager(model=model, engine=engine)
        for step, _ in prompt_batches(args, model_id):
            ckpt_manager.sync_weights(merge_and_sync=False)
            parts = [channel.get(f'rollout/{step}/{rank}') for rank in range(args.sampler_ranks)]
            merged = {key: [value for part in parts for value in part[key]] for key in parts[0]}
            curve.append(train_on(args, model, merged, step, role.rank, role.size))
        return curve if role.rank == 0 else None
    sampler = build_sampler(model_id)
    ckpt_manager = CheckpointEngineManager(sampler=sampler, engine=engine)
    for step, batch in prompt_batches(args, model_id):
        ckpt_manager.sync_weights(merge_and_sync=False)
        channel.put(f'rollout/{step}/{role.rank}', rollout(args, sampler, batch),  # its DataLoader share
                    readers=job_size - args.sampler_ranks)
    return None


def main():
    args = parse_args()
    model_id = assets.tiny_model_path('qwen3')
    if 'RANK' in os.environ and int(os.environ.get('WORLD_SIZE', '1')) > 1:
        curve = run_as_roles(args, model_id)
    else:
        twinkle.initialize(seed=0)
        curve = run_in_one_process(args, model_id)
    if curve is None:
        return
    if args.plot:
        plot(curve, args)
    print('rewards per step: ' + ', '.join(f'{value:.4f}' for value in curve))


def plot(curve, args):
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


if __name__ == '__main__':
    main()
