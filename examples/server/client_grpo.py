"""The seeds' client GRPO example on Countdown: save the adapter, sample with it, score, train -- over HTTP.

    twinkle serve --model MODEL_PATH --api-key KEY=carol --port 8000 &
    TWINKLE_SERVER_URL=http://127.0.0.1:8000 TWINKLE_SERVER_TOKEN=KEY python examples/server/client_grpo.py

Countdown problems from the shipped countdown_tiny.jsonl; rewards: FormatReward + CountdownReward
(the tiny model's weights are random, so both stay near 0: the point is the loop, not the score).
"""
import os
from pathlib import Path

from peft import LoraConfig

from twinkle import get_logger
from twinkle.advantage import GRPOAdvantage
from twinkle.metric import CompletionRewardMetric
from twinkle.reward import CountdownReward, FormatReward
from twinkle_client import init_twinkle_client
from twinkle_client.dataloader import DataLoader
from twinkle_client.dataset import Dataset, DatasetMeta
from twinkle_client.model import MultiLoraTransformersModel
from twinkle_client.sampler import vLLMSampler

from client_sft import model_id

logger = get_logger()
NUM_GENERATIONS, MAX_NEW_TOKENS, STEPS, BATCH_SIZE = 4, 8, int(os.environ.get('STEPS', 2)), 2


def train():
    base_model = model_id()
    init_twinkle_client(base_url=os.environ.get('TWINKLE_SERVER_URL', 'http://127.0.0.1:8000'),
                        api_key=os.environ.get('TWINKLE_SERVER_TOKEN', 'EMPTY_TOKEN'))
    dataset = Dataset(dataset_meta=DatasetMeta(str(Path(__file__).with_name('countdown_tiny.jsonl'))))
    dataset.set_template('Qwen3_5Template', model_id=base_model, max_length=256)
    dataset.map('CountdownProcessor')
    dataset.encode(add_generation_prompt=True, batched=True)
    dataloader = DataLoader(dataset=dataset, batch_size=BATCH_SIZE, shuffle=False)
    model = MultiLoraTransformersModel(model_id=base_model)
    model.add_adapter_to_model('default', LoraConfig(target_modules='all-linear', r=8, lora_alpha=32))
    model.set_loss('GRPOLoss', epsilon=0.2, beta=0.0)
    model.set_optimizer('AdamW', lr=1e-3)
    model.set_processor('InputProcessor')
    model.set_template('Qwen3_5Template')
    sampler = vLLMSampler(model_id=base_model)
    advantage_fn, metrics = GRPOAdvantage(), CompletionRewardMetric()
    for step, batch in enumerate(dataloader):
        if step >= STEPS:
            break
        adapter_uri = model.save(name=f'grpo-sampler-step-{step}', save_optimizer=False)
        response = sampler.sample(inputs=batch, sampling_params={'max_tokens': MAX_NEW_TOKENS, 'temperature': 1.0,
                                                                 'top_p': 0.95, 'logprobs': 1, 'seed': step},
                                  adapter_uri=adapter_uri, num_samples=NUM_GENERATIONS)
        sequences = response.get('sequences', [])
        features = [seq.get('new_input_feature') for seq in sequences]
        old_logps = [seq.get('logprobs', []) for seq in sequences]
        rewards = [a + b for a, b in zip(FormatReward()(features, []), CountdownReward()(features, []))]
        metrics.reset()
        metrics.accumulate(completion_lengths=[len(seq.get('tokens', [])) for seq in sequences],
                           rewards={'total': rewards})
        advantages = advantage_fn(rewards, num_generations=NUM_GENERATIONS, scale='group').tolist()
        result = model.forward_backward(inputs=features, advantages=advantages, old_logps=old_logps)
        model.clip_grad_norm(1.0)
        model.step()
        model.zero_grad()
        model.lr_step()
        log = metrics.calculate()
        log.update(model.calculate_metric())
        logger.info(f'step {step} sequences {len(sequences)} loss {result["loss"]!r} reward {log["reward/total/mean"]}')
    logger.info(f'saved {model.save(name="grpo-countdown-final", save_optimizer=True)}')


if __name__ == '__main__':
    train()
