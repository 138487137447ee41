"""The seeds' SFT example (quick-start.md) on the embedded tiny Qwen3 and self-cognition data, twice:
examples/sft.py for torchrun, examples/ray_sft.py for Ray. The two differ only in their
twinkle.initialize(...) line (the suite diffs them and compares their losses).

    torchrun --nproc_per_node=2 examples/sft.py   # 2 ranks, FSDP over them
    python examples/ray_sft.py                    # a local Ray cluster: the same 2 ranks as actors
    make train MODE=ray

Under Ray the driver builds the dataset and the DataLoader, which yields whole global batches; the
model is a proxy of a TransformersModel on each actor of group 'default', and each call cuts the
batch into the data ranks' shares -- the shares the torchrun ranks' DataLoaders read themselves.
remote_group= and device_group are ignored under torchrun.
"""
import os

from peft import LoraConfig

import twinkle
from twinkle import DeviceGroup, DeviceMesh, assets, get_device_placement, get_logger
from twinkle.dataloader import DataLoader
from twinkle.dataset import Dataset, DatasetMeta
from twinkle.model import TransformersModel
from twinkle.preprocessor import SelfCognitionProcessor

MODEL_ID = os.environ.get('MODEL_ID', assets.tiny_model_path('qwen3'))
DATASET_ID = os.environ.get('DATASET_ID', assets.self_cognition_path())
STEPS = int(os.environ.get('STEPS', 5))
device_group = [DeviceGroup(name='default', ranks=2, device_type=os.environ.get('DEVICE_TYPE', 'cpu'))]
device_mesh = DeviceMesh.from_sizes(fsdp_size=2)
twinkle.initialize(mode='ray', groups=device_group, global_device_mesh=device_mesh)
logger = get_logger()


def train():
    dataset = Dataset(dataset_meta=DatasetMeta(DATASET_ID, data_slice=range(8 * STEPS)))
    dataset.set_template('Qwen3_5Template', model_id=MODEL_ID)
    dataset.map(SelfCognitionProcessor('twinkle LLM', 'ModelScope Community'))
    dataset.encode()
    # Global batch size = 8: each of the 2 data ranks trains on 4 samples of it
    dataloader = DataLoader(dataset=dataset, batch_size=8, shuffle=False)
    model = TransformersModel(model_id=MODEL_ID, remote_group='default')
    lora_config = LoraConfig(r=8, lora_alpha=32, target_modules='all-linear')
    model.add_adapter_to_model('default', lora_config, gradient_accumulation_steps=1)
    model.set_optimizer(optimizer_cls='AdamW', lr=1e-3)
    model.set_lr_scheduler(scheduler_cls='CosineWarmupScheduler', num_warmup_steps=1, num_training_steps=STEPS)
    logger.info(get_device_placement())
    for step, batch in enumerate(dataloader):
        model.forward_backward(inputs=batch)
        model.clip_grad_and_step()
        metric = model.calculate_metric(is_training=True)
        logger.info(f'step {step} loss {metric["loss"]!r}')
    model.save('last-checkpoint')


if __name__ == '__main__':
    train()
