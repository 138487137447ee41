"""The one place that patches megatron-core, and only for CPU-only processes (gloo, CPU tensors).

megatron-core has no CPU path. With the local (non Transformer-Engine) layer spec and
``use_cpu_initialization=True`` a GPTModel builds on CPU, but its forward and backward stop on
four CUDA-only things, and the shim answers each with its CPU equivalent:

- ``cuda_device_is_cpu``: megatron-core allocates its working tensors with
  ``device=torch.cuda.current_device()`` (``GlobalMemoryBuffer.get_tensor``, the sequence-parallel
  gather and reduce-scatter outputs, the rotary frequencies, ...). On a CPU build of torch that
  call raises ``AssertionError: Torch not compiled with CUDA enabled``. In the megatron-core
  modules listed in ``DEVICE_MODULES`` (and nowhere else), ``torch.cuda.current_device()`` then
  answers ``torch.device('cpu')``; there too the pipeline schedules' ``torch.zeros(...,
  device="cuda")`` is made on the CPU and p2p's ``torch.cuda.synchronize()`` returns at once (both
  raise the same error otherwise).
- ``cpu_rng_tracker``: ``CudaRNGStatesTracker`` keeps the tensor-parallel RNG states that
  ``model_parallel_cuda_manual_seed`` adds (``add``: ``torch.cuda.get_rng_state()``) and that every
  sequence-parallel block and dropout forks (``fork``: ``torch.cuda.default_generators``); both
  raise on CPU. They then keep and swap CPU generator states instead, which is what CPU dropout
  draws from: the same per-rank seeds (``seed + 2718 + tp_rank``), the same nesting.
- ``cpu_causal_mask``: called without an ``attention_mask``, the softmax builds its causal mask
  with ``torch.ones(sq, sq, device="cuda")`` (``transformer.utils.get_default_causal_mask``):
  ``AssertionError: Torch not compiled with CUDA enabled``. It is then built on the CPU.
- ``cpu_tied_embedding_copy``: with pp > 1 and tied embeddings the last stage's copy of the
  embedding is moved with ``weight.data.cuda()`` before it is all-reduced from the first stage
  (same error); during that set-up call a CPU tensor stays where it is.

Never on a GPU: ``apply_cpu_shim`` raises when the model's device is not the CPU or when CUDA is
visible to the process (hide it with ``CUDA_VISIBLE_DEVICES=`` for a CPU run on a GPU host).
Not covered: activation recomputation (``CheckpointFunction`` saves CUDA RNG states itself).
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Callable, Dict, List, Optional, Tuple

import torch

from twinkle.utils.logger import get_logger

logger = get_logger(__name__)

# The megatron-core modules a CPU run reaches that allocate on (or wait for) "the CUDA device":
# found by running GPTModel forward+backward at tp=2 with sequence parallelism, the MoE layer at
# ep=2, and the pipeline schedule at pp=2 on gloo.
DEVICE_MODULES = (
    'megatron.core.utils',
    'megatron.core.tensor_parallel.layers',
    'megatron.core.tensor_parallel.mappings',
    'megatron.core.models.common.embeddings.rotary_pos_embedding',
    'megatron.core.transformer.moe.router',
    'megatron.core.transformer.moe.experts',
    'megatron.core.pipeline_parallel.p2p_communication',
    'megatron.core.pipeline_parallel.schedules',
)

_applied: List[str] = []


class _CudaSeenFromCpu:
    """``torch.cuda`` for a patched module: the current device is the CPU, the rest is torch.cuda's."""

    @staticmethod
    def current_device() -> torch.device:
        return torch.device('cpu')

    @staticmethod
    def synchronize(device=None) -> None:
        """Nothing to wait for: CPU work is done when it returns (gloo's ``wait()`` has waited)."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _TorchSeenFromCpu:
    """``torch`` for a patched module: ``torch.cuda`` is ``_CudaSeenFromCpu``, the rest is torch's."""

    cuda = _CudaSeenFromCpu()

    @staticmethod
    def zeros(*size, device=None, **kwargs) -> torch.Tensor:
        """``torch.zeros`` with ``device='cuda'`` (the pipeline schedules' token count) on the CPU."""
        on_cuda = device is not None and torch.device(device).type == 'cuda'
        return torch.zeros(*size, device='cpu' if on_cuda else device, **kwargs)

    def __getattr__(self, name):
        return getattr(torch, name)


_TORCH_SEEN_FROM_CPU = _TorchSeenFromCpu()


def _patch_cuda_device_is_cpu() -> str:
    """Rebind ``torch`` in each of DEVICE_MODULES (not torch itself: other libraries keep CUDA's answer)."""
    for name in DEVICE_MODULES:
        module = importlib.import_module(name)
        if getattr(module, 'torch', None) is not torch:
            raise RuntimeError(f'{name} does not hold torch as a global any more: this megatron-core release '
                               f'needs a new CPU shim (tested with megatron-core 0.16)')
        module.torch = _TORCH_SEEN_FROM_CPU
    return (f"torch.cuda.current_device() answers 'cpu', torch.cuda.synchronize() returns at once and "
            f"torch.zeros(device='cuda') is made on the CPU in {', '.join(DEVICE_MODULES)}")


def _add_cpu_state(tracker, name: str, seed: int) -> None:
    """``CudaRNGStatesTracker.add`` with a CPU generator state seeded by ``seed``."""
    if seed in tracker.seeds_:
        raise ValueError(f'seed {seed} is already tracked (RNG state names: {", ".join(tracker.states_)})')
    if name in tracker.states_:
        raise ValueError(f'RNG state {name!r} is already tracked')
    tracker._is_initialized = True
    tracker.seeds_.add(seed)
    tracker.states_[name] = torch.Generator().manual_seed(seed).get_state()


@contextlib.contextmanager
def _fork_cpu_state(tracker, name: Optional[str] = None):
    """``CudaRNGStatesTracker.fork`` on the CPU generator: draw from state ``name``, then put the
    outer state back (nested forks restore in order, as on CUDA)."""
    from megatron.core.tensor_parallel import random as megatron_random
    name = megatron_random._MODEL_PARALLEL_RNG_TRACKER_NAME if name is None else name
    if name not in tracker.states_:
        raise KeyError(f'RNG state {name!r} is not tracked: call model_parallel_cuda_manual_seed first')
    outer = torch.get_rng_state()
    torch.set_rng_state(tracker.states_[name])
    try:
        yield
    finally:
        tracker.states_[name] = torch.get_rng_state()
        torch.set_rng_state(outer)


def _patch_cpu_rng_tracker() -> str:
    """Give CudaRNGStatesTracker CPU ``add`` and ``fork`` (its other methods only move dicts)."""
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker
    CudaRNGStatesTracker.add = _add_cpu_state
    CudaRNGStatesTracker.fork = _fork_cpu_state
    return 'CudaRNGStatesTracker.add/fork keep and swap CPU generator states'


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    """megatron-core's ``get_default_causal_mask`` (True above the diagonal: masked) on the CPU."""
    return torch.ones(sq, sq, dtype=torch.bool).triu(diagonal=1)


def _patch_cpu_causal_mask() -> str:
    """The softmax's causal mask for a call without ``attention_mask`` (its only user holds it by name)."""
    from megatron.core.fusions import fused_softmax
    fused_softmax.get_default_causal_mask = _cpu_causal_mask
    return 'the default causal mask (attention_mask=None) is built on the CPU, not device="cuda"'


def _patch_cpu_tied_embedding_copy() -> str:
    """With pp > 1 and tied embeddings, ``LanguageModule.setup_embeddings_and_output_layer`` moves
    the first/last stage copy with ``weight.data.cuda()`` before all-reducing it (a Tensor method,
    out of reach of ``cuda_device_is_cpu``). During that call only, ``Tensor.cuda`` leaves a CPU
    tensor where it is."""
    from megatron.core.models.common.language_module.language_module import LanguageModule
    setup = LanguageModule.setup_embeddings_and_output_layer

    def setup_on_cpu(self, *args, **kwargs):
        cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda tensor, *_, **__: tensor
        try:
            return setup(self, *args, **kwargs)
        finally:
            torch.Tensor.cuda = cuda
    LanguageModule.setup_embeddings_and_output_layer = setup_on_cpu
    return 'the tied embedding copy between the first and last pipeline stages stays on the CPU'


_PATCHES: Dict[str, Callable[[], str]] = {
    'cuda_device_is_cpu': _patch_cuda_device_is_cpu,
    'cpu_rng_tracker': _patch_cpu_rng_tracker,
    'cpu_causal_mask': _patch_cpu_causal_mask,
    'cpu_tied_embedding_copy': _patch_cpu_tied_embedding_copy,
}


def apply_cpu_shim(device_type: str) -> Tuple[str, ...]:
    """Patch megatron-core for CPU tensors (once per process; later calls change nothing).

    ``device_type`` is the torch device type the model runs on; anything but 'cpu' raises, and so
    does a process that can see a CUDA device. Returns ``applied_patches()``.
    """
    from twinkle.model.megatron import require_megatron
    require_megatron()
    if device_type != 'cpu':
        raise ValueError(f"device_type={device_type!r}: the megatron-core CPU shim is for 'cpu' only; "
                         f'megatron-core runs unpatched on {device_type}')
    if torch.cuda.is_available():
        raise RuntimeError('a CUDA device is visible to this process: never patch megatron-core on a GPU '
                           '(run the model on cuda, or hide the GPUs with CUDA_VISIBLE_DEVICES= for a CPU run)')
    for name, patch in _PATCHES.items():
        if name not in _applied:
            logger.info('megatron-core CPU shim: %s (%s)', name, patch())
            _applied.append(name)
    return applied_patches()


def applied_patches() -> Tuple[str, ...]:
    """The names of the patches applied in this process, in order (empty before ``apply_cpu_shim``)."""
    return tuple(_applied)
