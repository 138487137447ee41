"""Test-wide set-up, and the device the kernel tests run on.

``TWINKLE_TEST_DEVICE`` (``cpu`` unless set) names it. On ``cpu``, TRITON_INTERPRET=1 is set before
anything imports triton, so that the Triton backends run their kernels on CPU tensors through the
interpreter. On ``cuda`` (``make gpu-check``) it is removed: the same tests then put their tensors
on the GPU and run the Triton kernels compiled, in fp32, bf16 and fp16.
"""
import logging
import os

TEST_DEVICE_TYPES = ('cpu', 'cuda')
_device_type = os.environ.get('TWINKLE_TEST_DEVICE', 'cpu')
if _device_type not in TEST_DEVICE_TYPES:
    raise ValueError(f'TWINKLE_TEST_DEVICE={_device_type!r} is not a test device; '
                     f'valid: {", ".join(TEST_DEVICE_TYPES)}')
if _device_type == 'cpu':
    os.environ['TRITON_INTERPRET'] = '1'
else:
    os.environ.pop('TRITON_INTERPRET', None)  # compiled: the interpreter would hide what the GPU does
os.environ.setdefault('TWINKLE_LOG_LEVEL', 'INFO')

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICE = torch.device(_device_type)
INTERPRETED = DEVICE.type == 'cpu'  # Triton kernels run through the interpreter
# Below fp32, Triton kernels are checked in fp16 alone under the interpreter (its bf16 arithmetic is
# broken), in fp16 and bf16 when compiled.
TRITON_LOW_PRECISION = (torch.float16,) if INTERPRETED else (torch.float16, torch.bfloat16)


def cpu_only(why: str):
    """Skips a test when the suite runs on a GPU, saying why it only makes sense on CPU."""
    return pytest.mark.skipif(DEVICE.type != 'cpu', reason=f'CPU only: {why}')


FAKE_NPU = 'a fake torch_npu on CPU tensors (nothing runs on an NPU; the CPU suite covers it)'


def require_cpu(why: str) -> None:
    """cpu_only for a fixture: skips the tests that use it when the suite runs on a GPU."""
    if DEVICE.type != 'cpu':
        pytest.skip(f'CPU only: {why}')


def pytest_configure(config):
    if DEVICE.type == 'cuda' and not torch.cuda.is_available():
        raise pytest.UsageError('TWINKLE_TEST_DEVICE=cuda but torch.cuda.is_available() is False; '
                                'unset it to run the suite on CPU')


def pytest_report_header(config):
    triton = 'interpreted (TRITON_INTERPRET=1)' if INTERPRETED else 'compiled'
    return f'twinkle test device: {DEVICE.type} (TWINKLE_TEST_DEVICE), Triton kernels {triton}'


@pytest.fixture
def twinkle_logs(caplog):
    """caplog wired to the 'twinkle' logger (it does not propagate to the root logger)."""
    logger = logging.getLogger('twinkle')
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger='twinkle')
    yield caplog
    logger.removeHandler(caplog.handler)


@pytest.fixture
def fresh_registry():
    """Clears configure()/TWINKLE_KERNELS overrides and cached choices around a test."""
    from twinkle.kernels import registry
    registry.configure()
    registry._chosen().clear()
    yield registry
    registry.configure()
    registry._chosen().clear()
