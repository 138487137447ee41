"""Only Dataset & DataLoader (the seeds' example), offline with the embedded assets.

The seeds load ``ms://swift/self-cognition`` and Qwen3.5's tokenizer from the hub; here the same
pipeline reads the shipped self-cognition rows and the tiny Qwen3's tokenizer, so it runs with
no network. Swap the two ids back for hub ids when online.

    python examples/dataset_only.py
"""
from twinkle import assets
from twinkle.dataloader import DataLoader
from twinkle.dataset import DatasetMeta, PackingDataset
from twinkle.preprocessor import SelfCognitionProcessor
from twinkle.processor import InputProcessor


def train():
    dataset_meta = DatasetMeta(dataset_id=assets.self_cognition_path())
    dataset = PackingDataset(dataset_meta)
    dataset.map(SelfCognitionProcessor(model_name='Twinkle Model', model_author='ModelScope Community'))
    dataset.set_template('Qwen3_5Template', model_id=assets.tiny_model_path('qwen3'), max_length=512)
    dataset.encode()
    dataset.pack_dataset()
    dataloader = DataLoader(dataset, batch_size=8)
    for data in dataloader:
        print(f'{len(dataloader)} steps of {len(data)} packed rows, '
              f'{sum(row["length"] for row in data)} tokens in this one')
        print({key: value[:12] if isinstance(value, list) else value for key, value in data[0].items()})
        batch = InputProcessor(padding_free=True)(data)  # what a model's forward takes
        print({key: tuple(value.shape) if hasattr(value, 'shape') else value for key, value in batch.items()})
        break


if __name__ == '__main__':
    train()
