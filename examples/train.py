"""The main job: LoRA finetune of the embedded tiny Qwen3 on the self-cognition data, offline.
One process, or under torchrun (`make train NPROC=2`) with FSDP2 over all ranks.

The seeds' training API end to end (Dataset -> Template -> DataLoader -> TransformersModel with a
LoRA adapter, AdamW, cosine warm-up), kernels chosen at load, a progress bar with loss and
tokens/s, a final summary (kernels, peak memory) and a checkpoint that plain peft loads.
"""
import argparse
import os
import time

import torch
from peft import LoraConfig
from tqdm import tqdm

import twinkle
from twinkle import assets, backends
from twinkle.dataloader import DataLoader
from twinkle.dataset import Dataset, DatasetMeta
from twinkle.model import TransformersModel
from twinkle.preprocessor import SelfCognitionProcessor


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--model', default=None, help='model id or path (default: embedded tiny Qwen3)')
    parser.add_argument('--samples', type=int, default=256)
    parser.add_argument('--epochs', type=int, default=2)
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--lr', type=float, default=5e-3)
    parser.add_argument('--output', default='outputs/last-checkpoint')
    return parser.parse_args()


def peak_memory_per_rank(device) -> list:
    peak = device.peak_memory()
    if not torch.distributed.is_initialized():
        return [peak]
    peaks = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(peaks, peak)
    return peaks


def main():
    args = parse_args()
    device = twinkle.initialize(seed=42)
    model_id = args.model or assets.tiny_model_path('qwen3')
    dataset = Dataset(DatasetMeta(assets.self_cognition_path(), data_slice=range(args.samples)))
    dataset.set_template('Qwen3_5Template', model_id=model_id, max_length=512)
    dataset.map(SelfCognitionProcessor('twinkle LLM', 'ModelScope Community'))
    dataset.encode()
    dataloader = DataLoader(dataset=dataset, batch_size=args.batch_size)

    model = TransformersModel(model_id=model_id)
    model.add_adapter_to_model('default', LoraConfig(r=8, lora_alpha=32, target_modules='all-linear'))
    model.set_optimizer('AdamW', lr=args.lr)
    total_steps = len(dataloader) * args.epochs
    model.set_lr_scheduler('CosineWarmupScheduler', num_warmup_steps=5, num_training_steps=total_steps)

    device.reset_peak_memory()
    started, history = time.perf_counter(), []
    with tqdm(total=total_steps, desc='train', unit='step', disable=int(os.environ.get('RANK', 0)) != 0) as progress:
        for _ in range(args.epochs):
            for batch in dataloader:
                model.forward_backward(inputs=batch)
                model.clip_grad_and_step()
                metric = model.calculate_metric(is_training=True)
                history.append(metric['loss'])
                progress.set_postfix(loss=f'{metric["loss"]:.3f}', tok_s=f'{metric["tokens_per_second"]:.0f}')
                progress.update()
    elapsed = time.perf_counter() - started
    path = model.save(args.output)
    peaks = peak_memory_per_rank(device)
    if int(os.environ.get('RANK', 0)) != 0:
        return
    configs = model.get_train_configs()
    print(f'\nloss: first {history[0]:.3f} -> last {history[-1]:.3f} over {len(history)} steps '
          f'({elapsed:.1f} s, device {device.type}, precision {configs["precision"]})')
    print('peak memory per rank: ' + ', '.join(f'{peak / 2**20:.0f} MiB' for peak in peaks)
          + (' (process high-water mark)' if device.type == 'cpu' else ''))
    print('kernels:')
    for op, choice in configs['kernels'].items():
        print(f'  {op:<28} {choice}')
    print(f'checkpoint: {path} (LoRA adapter, loads with peft.PeftModel.from_pretrained)')
    if backends.current().type == 'cpu':
        print('note: CPU run; GPU/NPU paths are verified by tests with fake devices only')


if __name__ == '__main__':
    main()
