"""Test-wide set-up. TRITON_INTERPRET must be set before anything imports triton, so that the
Triton backends run their kernels on CPU tensors through the interpreter."""
import logging
import os

os.environ['TRITON_INTERPRET'] = '1'
os.environ.setdefault('TWINKLE_LOG_LEVEL', 'INFO')

import pytest  # noqa: E402


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
    registry._chosen.clear()
    yield registry
    registry.configure()
    registry._chosen.clear()
