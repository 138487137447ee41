"""Bad TWINKLE_* variables and arguments: one error naming the variable or argument and the fix
(or, for the log level, a warning and the default); `twinkle env` never crashes."""
import subprocess
import sys

import pytest
import torch

from twinkle import backends, hub, kernels
from twinkle.backends.cpu import CpuBackend


@pytest.fixture
def fresh_device():
    backends.reset()
    yield
    backends.reset()


@pytest.mark.parametrize('family', ['cuda', 'mps'])
def test_a_forced_device_that_is_absent_is_named(monkeypatch, fresh_device, family):
    monkeypatch.setenv('TWINKLE_DEVICE', family)
    with pytest.raises(RuntimeError, match=rf"TWINKLE_DEVICE='{family}' but this host has no usable {family} device"):
        backends.current()


def test_twinkle_env_reports_instead_of_crashing():
    env = {'TWINKLE_DEVICE': 'cuda', 'TWINKLE_LOG_LEVEL': 'LOUD', 'PATH': '/usr/bin:/bin'}
    done = subprocess.run([sys.executable, '-m', 'twinkle', 'env'], capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ERROR RuntimeError: TWINKLE_DEVICE='cuda'" in done.stdout
    assert 'liger-kernel' in done.stdout  # the other sections are still there
    assert "TWINKLE_LOG_LEVEL='LOUD' is not a level" in done.stderr


def test_cpu_variables_with_bad_values_are_named(monkeypatch):
    monkeypatch.setenv('TWINKLE_CPU_DTYPE', 'fp8')
    with pytest.raises(ValueError, match="TWINKLE_CPU_DTYPE='fp8' is not a CPU training dtype"):
        CpuBackend().default_dtype()
    monkeypatch.setenv('TWINKLE_CPU_DTYPE', 'bf16')
    assert CpuBackend().default_dtype() == torch.bfloat16
    monkeypatch.setenv('TWINKLE_CPU_TUNING', 'maybe')
    with pytest.raises(ValueError, match="TWINKLE_CPU_TUNING='maybe': use 1"):
        CpuBackend().tune_process()


@pytest.mark.parametrize('timeout', [float('inf'), float('nan')])
def test_an_endless_timeout_is_refused(monkeypatch, timeout):
    import twinkle
    monkeypatch.delenv('RANK', raising=False)
    with pytest.raises(ValueError, match='timeout must be a positive, finite number of seconds'):
        twinkle.initialize(timeout=timeout)


def test_rms_norm_eps_of_the_wrong_type_is_named():
    x, weight = torch.randn(2, 8), torch.ones(8)
    with pytest.raises(ValueError, match="eps must be a number >= 0, got '1e-6'"):
        kernels.rms_norm(x, weight, eps='1e-6')


def test_moe_unpermute_refuses_a_negative_row_map(monkeypatch):
    """Never wrapped to the last row: the reference fails on it; TWINKLE_CHECK_VALUES=1 names it."""
    expert_out, weights, row_map = torch.randn(4, 3), torch.ones(2, 2), torch.tensor([[0, 1], [-1, 3]])
    with pytest.raises((IndexError, RuntimeError), match='out of range'):
        kernels.moe_unpermute(expert_out, row_map, weights, backend='reference')
    monkeypatch.setenv('TWINKLE_CHECK_VALUES', '1')
    with pytest.raises(ValueError, match=r'row_map: ids must be in \[0, 4\); found -1'):
        kernels.moe_unpermute(expert_out, row_map, weights, backend='reference')


@pytest.mark.parametrize('missing', ['/no/such/model', './no-such-dir', 'no-such-data.jsonl', 'a/b/c'])
def test_a_missing_local_path_is_not_sent_to_a_hub(missing):
    with pytest.raises(FileNotFoundError, match=f"'{missing}' does not exist"):
        hub.model_dir(missing)
