"""Process set-up shared by every entry point."""
from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch

from . import backends
from .utils.logger import get_logger

logger = get_logger(__name__)


def initialize(mode: str = 'local', *, seed: Optional[int] = 42, full_determinism: bool = False, **kwargs):
    """Detect the device, apply its process tuning and seed every RNG.

    Distributed set-up (meshes, process groups) arrives with the parallel layer; until then any
    argument for it is refused rather than ignored.
    """
    if mode != 'local':
        raise ValueError(f'mode={mode!r} is not supported yet; valid: "local"')
    if kwargs:
        raise TypeError(f'initialize() got unsupported arguments: {", ".join(sorted(kwargs))}')
    device = backends.current()
    if seed is not None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
    if full_determinism:
        torch.use_deterministic_algorithms(True)
    return device
