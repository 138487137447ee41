"""The seeds' single-device example (overview.md), with the embedded tiny Qwen3 and self-cognition
data in place of the hub ids: LoRA, AdamW, cosine warm-up, metrics every few steps, a checkpoint."""
import os

from peft import LoraConfig

from twinkle import assets, get_device_placement, get_logger
from twinkle.dataloader import DataLoader
from twinkle.dataset import Dataset, DatasetMeta
from twinkle.model import TransformersModel
from twinkle.preprocessor import SelfCognitionProcessor

logger = get_logger()
MODEL_ID = os.environ.get('MODEL_ID', assets.tiny_model_path('qwen3'))
DATASET_ID = os.environ.get('DATASET_ID', assets.self_cognition_path())
NUM_SAMPLES = int(os.environ.get('NUM_SAMPLES', 1000))


def train():
    # 1000 samples
    dataset = Dataset(dataset_meta=DatasetMeta(DATASET_ID, data_slice=range(NUM_SAMPLES)))
    # Set template to prepare encoding
    dataset.set_template('Qwen3_5Template', model_id=MODEL_ID)
    # Preprocess the dataset to standard format
    dataset.map(SelfCognitionProcessor('twinkle LLM', 'ModelScope Community'))
    # Encode dataset
    dataset.encode()
    # Global batch size = 8, for GPUs, so 1 sample per GPU
    dataloader = DataLoader(dataset=dataset, batch_size=8)
    # Use a TransformersModel
    model = TransformersModel(model_id=MODEL_ID)
    lora_config = LoraConfig(r=8, lora_alpha=32, target_modules='all-linear')
    # Add a lora to model, with name `default`
    # Comment this to use full-parameter training
    model.add_adapter_to_model('default', lora_config, gradient_accumulation_steps=2)
    # Add Optimizer for lora `default`
    model.set_optimizer(optimizer_cls='AdamW', lr=1e-4)
    # Add LRScheduler for lora `default`
    model.set_lr_scheduler(
        scheduler_cls='CosineWarmupScheduler', num_warmup_steps=5, num_training_steps=len(dataloader))
    logger.info(get_device_placement())
    # Print the training config
    logger.info(model.get_train_configs())
    logger.info(f'Total steps: {len(dataloader)}')
    for step, batch in enumerate(dataloader):
        # Do forward and backward
        model.forward_backward(inputs=batch)
        # Step
        model.clip_grad_and_step()
        if step % 20 == 0:
            # Print metric
            metric = model.calculate_metric(is_training=True)
            logger.info(f'Current is step {step} of {len(dataloader)}, metric: {metric}')
    model.save(f'last-checkpoint')


if __name__ == '__main__':
    train()
