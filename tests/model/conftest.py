import pytest
import torch
from transformers import Qwen3Config

VOCAB = 1024


@pytest.fixture
def tiny_config():
    return Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)


def token_batch(size=8, length=20, seed=0, vocab=VOCAB):
    """A list of features as the DataLoader yields them: random lengths, prompt tokens not trained."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(size):
        n = int(torch.randint(length // 2, length + 1, (1,), generator=generator))
        ids = torch.randint(0, vocab, (n,), generator=generator).tolist()
        prompt = n // 3
        rows.append({'input_ids': ids, 'labels': [-100] * prompt + ids[prompt:], 'attention_mask': [1] * n,
                     'position_ids': list(range(n)), 'length': n})
    return rows
