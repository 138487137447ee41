"""The main job: LoRA finetune of the embedded tiny Qwen3-MoE on the self-cognition data, offline.

`make train` runs it under torchrun on 2 ranks with expert parallelism: each rank holds
num_experts / ep_size experts of every MoE layer, tokens travel to their experts' owners and back
by all-to-all, and FSDP2 shards the rest over all ranks. `make train NPROC=1`: one plain process.

The seeds' training API end to end (Dataset -> Template -> DataLoader -> TransformersModel with a
LoRA adapter on attention, lm_head and expert parameters, AdamW, cosine warm-up), kernels chosen at
load, a progress bar, a final summary (loss curve PNG, tokens/s, peak memory per rank, kernel
choices, the greedy answer to a held-out question before and after) and a checkpoint that plain
peft loads on one process (all experts, whatever ep_size).

Why more than LoRA: the tiny model's weights are random. Its tied embedding/lm_head (std 0.02 over
64 dims) can raise a token's logit by ~1.3 at most whatever the layers below do, so a rank-16 LoRA on
lm_head gives each token's logit a trainable direction (it stays fused: no logits are built, see
``twinkle.kernels.causal_lm``), and the input embedding is trained in full (``modules_to_save``: a
trainable copy, so lm_head keeps the frozen tied weight plus its LoRA) so that tokens become
distinguishable to the random layers. Measured on 2 CPU ranks: LoRA alone plateaus near loss 4.5-5
and answers with punctuation; with the embedding it falls to ~3.7 and names itself. 3 epochs at a
peak lr of 3e-3 (1e-2 spiked the loss to 27) decaying to 0.3x. A pretrained model needs none of this.
"""
import argparse
import os
import time
from pathlib import Path

import torch
from peft import LoraConfig
from tqdm import tqdm

import twinkle
from twinkle import DeviceMesh, assets, backends
from twinkle.dataloader import DataLoader
from twinkle.dataset import Dataset, DatasetMeta
from twinkle.model import TransformersModel
from twinkle.preprocessor import SelfCognitionProcessor

EXPERT_PARAMETERS = ['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']
LORA_MODULES = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'lm_head']
NAME, AUTHOR = 'twinkle LLM', 'ModelScope Community'
ANSWER_TOKENS = 16


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default=None, help='model id or path (default: embedded tiny Qwen3-MoE)')
    parser.add_argument('--ep-size', type=int, default=None, help='expert-parallel ranks (default: all ranks)')
    parser.add_argument('--samples', type=int, default=256)
    parser.add_argument('--epochs', type=int, default=3)
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--lr', type=float, default=3e-3)
    parser.add_argument('--output', default='outputs/last-checkpoint')
    return parser.parse_args()


def build_mesh(ep_size):
    """EP over ``ep_size`` ranks (default all), FSDP over the rest; None for one process."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if world_size == 1:
        return None
    ep_size = ep_size or world_size
    if world_size % ep_size:
        raise ValueError(f'--ep-size {ep_size} must divide the {world_size} ranks')
    return DeviceMesh.from_sizes(world_size=world_size, ep_size=ep_size, fsdp_size=world_size // ep_size)


def gather_per_rank(value) -> list:
    if not torch.distributed.is_initialized():
        return [value]
    values = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def plot_loss(history: list, path: Path) -> str:
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return 'not drawn (pip install matplotlib, or "twinkle[dev]")'
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot(range(1, len(history) + 1), history)
    axes.set(xlabel='optimizer step', ylabel='loss (mean per token)', title='LoRA finetune of tiny Qwen3-MoE')
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return str(path)


def held_out_question(samples: int) -> str:
    """The first English question after the trained rows that asks the model's name."""
    import json
    with open(assets.self_cognition_path(), encoding='utf-8') as handle:
        rows = [json.loads(line) for line in handle][samples:]
    row = next((row for row in rows if row['lang'] == 'en' and 'name' in row['query']), None)
    if row is None:
        raise ValueError(f'--samples {samples} leaves no held-out English question; use fewer samples')
    return row['query'].replace('{name}', NAME).replace('{author}', AUTHOR)


def greedy_answer(model: TransformersModel, template, question: str) -> str:
    """A fixed number of greedy steps (every rank runs the same forwards: EP and FSDP need all of them)."""
    trajectory = SelfCognitionProcessor(NAME, AUTHOR).preprocess({'query': question, 'response': ''})
    prompt = template.encode(trajectory, add_generation_prompt=True)['input_ids']
    generated = []
    for _ in range(ANSWER_TOKENS):
        ids = prompt + generated
        feature = dict(input_ids=ids, attention_mask=[1] * len(ids), position_ids=list(range(len(ids))),
                       length=len(ids))
        logits = model.forward_only(inputs=[feature]).logits
        generated.append(int(logits[0, -1].argmax()))
    text = template.decode(generated, skip_special_tokens=False)
    return text.split('<|im_end|>')[0].strip()


def main():
    args = parse_args()
    device = twinkle.initialize(seed=42, global_device_mesh=build_mesh(args.ep_size))
    model_id = args.model or assets.tiny_model_path('qwen3_moe')
    dataset = Dataset(DatasetMeta(assets.self_cognition_path(), data_slice=range(args.samples)))
    dataset.set_template('Qwen3_5Template', model_id=model_id, max_length=512)
    dataset.map(SelfCognitionProcessor(NAME, AUTHOR))
    dataset.encode()
    dataloader = DataLoader(dataset=dataset, batch_size=args.batch_size)

    model = TransformersModel(model_id=model_id)
    lora = LoraConfig(r=16, lora_alpha=64, target_modules=LORA_MODULES, target_parameters=EXPERT_PARAMETERS,
                      modules_to_save=['embed_tokens'])
    model.add_adapter_to_model('default', lora)
    model.set_optimizer('AdamW', lr=args.lr)
    total_steps = len(dataloader) * args.epochs
    model.set_lr_scheduler('CosineWarmupScheduler', num_warmup_steps=5, num_training_steps=total_steps,
                           min_lr_ratio=0.3)

    is_first_rank = int(os.environ.get('RANK', '0')) == 0
    question = held_out_question(args.samples)
    answer_before = greedy_answer(model, dataset.template, question)
    device.reset_peak_memory()
    started, history, tokens = time.perf_counter(), [], 0
    with tqdm(total=total_steps, desc='train', unit='step', disable=not is_first_rank) as progress:
        for _ in range(args.epochs):
            for batch in dataloader:
                model.forward_backward(inputs=batch)
                model.clip_grad_and_step()
                metric = model.calculate_metric(is_training=True)  # summed over ranks
                history.append(metric['loss'])
                tokens += metric['tokens']
                progress.set_postfix(loss=f'{metric["loss"]:.3f}', tok_s=f'{metric["tokens_per_second"]:.0f}')
                progress.update()
    elapsed = time.perf_counter() - started
    answer_after = greedy_answer(model, dataset.template, question)
    path = model.save(args.output)
    peaks = gather_per_rank(device.peak_memory())
    if not is_first_rank:
        return
    configs = model.get_train_configs()
    mesh = twinkle.parallel.global_mesh()
    print(f'\nloss: first {history[0]:.3f} -> last {history[-1]:.3f} ({history[0] / history[-1]:.1f}x lower) over {len(history)} steps '
          f'({elapsed:.1f} s, {tokens / elapsed:.0f} trained tokens/s, device {device.type}, '
          f'precision {configs["precision"]}, {mesh.describe_sizes() if mesh and mesh.world_size > 1 else "one process"})')
    print(f'held-out question: {question!r}\n  before training: {answer_before!r}\n  after training:  {answer_after!r}')
    print(f'loss curve: {plot_loss(history, Path(args.output).parent / "loss_curve.png")}')
    print('peak memory per rank: ' + ', '.join(f'{peak / 2**20:.0f} MiB' for peak in peaks)
          + (' (process high-water mark)' if device.type == 'cpu' else ''))
    print('kernels:')
    for op, choice in configs['kernels'].items():
        print(f'  {op:<28} {choice}')
    print(f'checkpoint: {path} (LoRA adapter with every expert and the trained embedding; loads with peft.PeftModel.from_pretrained)')
    if backends.current().type == 'cpu':
        print('note: CPU run; GPU/NPU paths are verified by tests with fake devices only')


if __name__ == '__main__':
    main()
