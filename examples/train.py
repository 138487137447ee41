"""The main job, for now: a tiny randomly initialised Qwen3, kernelized, trained offline.

It learns a synthetic next-token task (arithmetic sequences modulo the vocabulary) in a plain
PyTorch loop, printing the kernels chosen and a falling loss. Later issues replace it with the
seeds' training API on embedded data.
"""
import argparse
import time

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

import twinkle
from twinkle import backends, kernels

logger = twinkle.get_logger(__name__)


def tiny_qwen3() -> Qwen3ForCausalLM:
    config = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=256, tie_word_embeddings=True)
    return Qwen3ForCausalLM(config)


def arithmetic_batch(generator: torch.Generator, batch: int, length: int, vocab: int) -> torch.Tensor:
    """Rows start + step * t (mod vocab): learnable from context, so the loss must fall."""
    start = torch.randint(0, vocab, (batch, 1), generator=generator)
    step = torch.randint(1, 8, (batch, 1), generator=generator)
    return (start + step * torch.arange(length)) % vocab


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--steps', type=int, default=60)
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--length', type=int, default=64)
    args = parser.parse_args()

    device = twinkle.initialize(seed=0)
    model = kernels.kernelize(tiny_qwen3().to(device.local_device()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    device.reset_peak_memory()
    started = time.perf_counter()
    for step in range(args.steps):
        input_ids = arithmetic_batch(generator, args.batch, args.length, model.config.vocab_size)
        input_ids = input_ids.to(device.local_device())
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == args.steps - 1:
            print(f'step {step:3d}  loss {loss.item():.4f}', flush=True)
    elapsed = time.perf_counter() - started
    print(f'\ndevice: {device.type}   steps: {args.steps}   time: {elapsed:.1f} s   '
          f'peak memory: {device.peak_memory() / 2**20:.0f} MiB')
    print('kernels chosen:')
    for row in kernels.report():
        print(f'  {row["op"]:<28} {row["backend"]:<10} {row["reason"]}')


if __name__ == '__main__':
    main()
