"""Kernels chosen at load lower the peak memory of a training step (fresh process per variant)."""
import json
import pathlib
import subprocess
import sys
import textwrap

PROBE = '''
    import json, sys, torch
    sys.path.insert(0, {root!r})
    from tests.model.conftest import token_batch
    from twinkle import assets, backends
    from twinkle.model import TransformersModel
    cpu = backends.current()
    model = TransformersModel(model_id=assets.tiny_model_path('qwen3'), kernels={kernels!r})
    model.set_optimizer('AdamW', lr=1e-3)
    def rl_inputs(batch):  # GRPO: every sample a completion with an advantage (on-policy: no old_logps)
        samples = [dict(input_ids=row['input_ids'], labels=row['labels']) for row in batch]
        return dict(inputs=samples, advantages=[(-1.0) ** i for i in range(len(samples))])
    loss = {loss!r}
    model.set_loss(loss)
    step = (lambda batch: dict(inputs=batch)) if loss == 'CrossEntropyLoss' else rl_inputs
    warm = token_batch(size=2, length=8, vocab=151936)
    model.forward_backward(**step(warm)); model.zero_grad()
    batch = step(token_batch(size=8, length=128, seed=1, vocab=151936))
    cpu.reset_peak_memory()
    base = cpu.peak_memory()
    model.forward_backward(**batch)
    model.clip_grad_and_step()
    print(json.dumps({{'peak_above_start': cpu.peak_memory() - base}}))
'''


def peak(kernels, loss='CrossEntropyLoss'):
    root = str(pathlib.Path(__file__).resolve().parents[2])
    probe = textwrap.dedent(PROBE.format(root=root, kernels=kernels, loss=loss))
    result = subprocess.run([sys.executable, '-c', probe],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])['peak_above_start']


def test_kernelized_training_step_peaks_lower():
    stock, ours = peak(None), peak('auto')
    print(f'full-parameter step, tiny Qwen3 (vocab 151936), ~800 tokens: peak above start '
          f'stock {stock / 2**20:.0f} MiB, kernels=auto {ours / 2**20:.0f} MiB')
    assert ours < 0.6 * stock


def test_kernelized_grpo_step_peaks_lower_through_fused_logps():
    """RL at the memory of SFT: GRPOLoss reads fused linear log-probs, never the logits."""
    stock, ours = peak(None, 'GRPOLoss'), peak('auto', 'GRPOLoss')
    sft = peak('auto')
    print(f'GRPO full-parameter step, tiny Qwen3 (vocab 151936), ~800 tokens: peak above start '
          f'stock {stock / 2**20:.0f} MiB, kernels=auto {ours / 2**20:.0f} MiB (SFT kernels=auto {sft / 2**20:.0f} MiB)')
    assert ours < 0.6 * stock
    assert ours < 1.25 * sft
