"""The seeds' torchrun example (overview.md): FSDP2 x DP over a DeviceMesh, with the embedded tiny
Qwen3 and self-cognition data in place of the hub ids.

    torchrun --nproc_per_node=4 examples/torchrun.py            # FSDP_SIZE=2 DP_SIZE=2 by default
"""
import os

from peft import LoraConfig

import twinkle
from twinkle import DeviceMesh, assets, get_device_placement, get_logger
from twinkle.dataloader import DataLoader
from twinkle.dataset import Dataset, DatasetMeta
from twinkle.model import TransformersModel
from twinkle.preprocessor import SelfCognitionProcessor

MODEL_ID = os.environ.get('MODEL_ID', assets.tiny_model_path('qwen3'))
DATASET_ID = os.environ.get('DATASET_ID', assets.self_cognition_path())
NUM_SAMPLES = int(os.environ.get('NUM_SAMPLES', 1000))
# Construct a device_mesh, fsdp=2, dp=2
device_mesh = DeviceMesh.from_sizes(fsdp_size=int(os.environ.get('FSDP_SIZE', 2)),
                                    dp_size=int(os.environ.get('DP_SIZE', 2)))
# use torchrun mode
twinkle.initialize(mode='local', global_device_mesh=device_mesh)
logger = get_logger()


def train():
    dataset = Dataset(dataset_meta=DatasetMeta(DATASET_ID, data_slice=range(NUM_SAMPLES)))
    dataset.set_template('Qwen3_5Template', model_id=MODEL_ID)
    dataset.map(SelfCognitionProcessor('twinkle LLM', 'ModelScope Community'))
    dataset.encode()
    # Global batch size = 8, each data rank gets its slice
    dataloader = DataLoader(dataset=dataset, batch_size=8)
    model = TransformersModel(model_id=MODEL_ID)
    lora_config = LoraConfig(r=8, lora_alpha=32, target_modules='all-linear')
    model.add_adapter_to_model('default', lora_config, gradient_accumulation_steps=2)
    model.set_optimizer(optimizer_cls='AdamW', lr=1e-4)
    model.set_lr_scheduler(
        scheduler_cls='CosineWarmupScheduler', num_warmup_steps=5, num_training_steps=len(dataloader))
    logger.info(get_device_placement())
    logger.info(model.get_train_configs())
    logger.info(f'Total steps: {len(dataloader)}')
    for step, batch in enumerate(dataloader):
        model.forward_backward(inputs=batch)
        model.clip_grad_and_step()
        if step % 20 == 0:
            metric = model.calculate_metric(is_training=True)
            logger.info(f'Current is step {step} of {len(dataloader)}, metric: {metric}')
    model.save(f'last-checkpoint')


if __name__ == '__main__':
    train()
