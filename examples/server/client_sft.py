"""The seeds' client SFT example: a LoRA on the service's base model, self-cognition data, over HTTP.

    twinkle serve --model MODEL_PATH --api-key KEY=alice --port 8000 &
    TWINKLE_SERVER_URL=http://127.0.0.1:8000 TWINKLE_SERVER_TOKEN=KEY MODEL_ID=MODEL_PATH \\
        python examples/server/client_sft.py

The data is prepared here (twinkle_client.dataset is twinkle's Dataset) and sent as encoded
features; the model's calls run on the service. MODEL_ID defaults to the embedded tiny Qwen3.
"""
import os

from peft import LoraConfig

from twinkle import get_logger
from twinkle_client import init_twinkle_client
from twinkle_client.dataloader import DataLoader
from twinkle_client.dataset import Dataset, DatasetMeta
from twinkle_client.model import MultiLoraTransformersModel

logger = get_logger()
base_url = os.environ.get('TWINKLE_SERVER_URL', 'http://127.0.0.1:8000')
api_key = os.environ.get('TWINKLE_SERVER_TOKEN', 'EMPTY_TOKEN')
STEPS = int(os.environ.get('STEPS', 3))
LR = float(os.environ.get('LR', 1e-3))


def model_id():
    if 'MODEL_ID' in os.environ:
        return os.environ['MODEL_ID']
    from twinkle import assets
    return assets.tiny_model_path('qwen3')


def train():
    base_model = model_id()
    client = init_twinkle_client(base_url=base_url, api_key=api_key)
    logger.info(f'serving: {client.get_server_capabilities()["model_id"]}')
    dataset = Dataset(dataset_meta=DatasetMeta(os.environ.get('DATASET_ID', _self_cognition()),
                                               data_slice=range(4 * STEPS)))
    dataset.set_template('Qwen3_5Template', model_id=base_model, max_length=256)
    dataset.map('SelfCognitionProcessor', init_args={'model_name': 'twinkle LLM', 'model_author': 'ModelScope Community'})
    dataset.encode(batched=True)
    dataloader = DataLoader(dataset=dataset, batch_size=4, shuffle=False)
    model = MultiLoraTransformersModel(model_id=base_model)
    model.add_adapter_to_model('default', LoraConfig(target_modules='all-linear'), gradient_accumulation_steps=1)
    model.set_template('Qwen3_5Template')
    model.set_processor('InputProcessor', padding_side='right')
    model.set_loss('CrossEntropyLoss')
    model.set_optimizer('AdamW', lr=LR)
    for step, batch in enumerate(dataloader):
        model.forward_backward(inputs=batch)
        model.clip_grad_and_step()
        metric = model.calculate_metric(is_training=True)
        logger.info(f'step {step} loss {metric["loss"]!r}')
    path = model.save(name='sft-final', save_optimizer=True)
    logger.info(f'saved {path}')


def _self_cognition():
    from twinkle import assets
    return assets.self_cognition_path()


if __name__ == '__main__':
    train()
