"""Optimizers and learning-rate schedules by name, as the seeds' API passes them."""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch.optim.lr_scheduler import LambdaLR

OPTIMIZERS = {name: getattr(torch.optim, name) for name in
              ('AdamW', 'Adam', 'SGD', 'Adafactor', 'Adagrad', 'RMSprop') if hasattr(torch.optim, name)}
OPTIMIZERS['default'] = torch.optim.AdamW  # the seeds' set_optimizer('default', lr=...)


def _warmup_then_decay(optimizer, num_warmup_steps: int, num_training_steps: int, min_lr_ratio: float,
                       decay: Callable[[float], float]) -> LambdaLR:
    """Linear warm-up over ``num_warmup_steps``, then ``decay(progress)`` from 1 to 0 scaled onto
    [min_lr_ratio, 1] of the learning rate."""
    if num_warmup_steps < 0 or num_training_steps < 1:
        raise ValueError(f'need num_warmup_steps >= 0 and num_training_steps >= 1, '
                         f'got {num_warmup_steps} and {num_training_steps}')

    def factor(step: int) -> float:
        if step < num_warmup_steps:
            return (step + 1) / (num_warmup_steps + 1)
        progress = min(1.0, (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * decay(progress)
    return LambdaLR(optimizer, factor)


def CosineWarmupScheduler(optimizer, num_warmup_steps: int = 0, num_training_steps: int = 1,
                          min_lr_ratio: float = 0.0) -> LambdaLR:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` x lr at ``num_training_steps``."""
    return _warmup_then_decay(optimizer, num_warmup_steps, num_training_steps, min_lr_ratio,
                              lambda progress: 0.5 * (1 + math.cos(math.pi * progress)))


def LinearWarmupScheduler(optimizer, num_warmup_steps: int = 0, num_training_steps: int = 1,
                          min_lr_ratio: float = 0.0) -> LambdaLR:
    """Linear warm-up, then linear decay to ``min_lr_ratio`` x lr at ``num_training_steps``."""
    return _warmup_then_decay(optimizer, num_warmup_steps, num_training_steps, min_lr_ratio,
                              lambda progress: 1 - progress)


def DefaultScheduler(optimizer, lr_decay_steps: int, max_lr: Optional[float] = None, lr_warmup_steps: int = 0,
                     min_lr: float = 0.0) -> LambdaLR:
    """Megatron's way of saying it (the seeds' ``set_lr_scheduler('default', lr_decay_steps=, max_lr=)``):
    linear warm-up to ``max_lr`` (default: the optimizer's lr), cosine decay to ``min_lr`` at
    ``lr_decay_steps``."""
    if max_lr is not None:
        if max_lr <= 0:
            raise ValueError(f'max_lr must be positive, got {max_lr!r}')
        for group in optimizer.param_groups:
            group['lr'] = group['initial_lr'] = max_lr
    peak = optimizer.param_groups[0]['lr']
    if not 0 <= min_lr <= peak:
        raise ValueError(f'min_lr must be in [0, max_lr={peak}], got {min_lr!r}')
    return CosineWarmupScheduler(optimizer, num_warmup_steps=lr_warmup_steps, num_training_steps=lr_decay_steps,
                                 min_lr_ratio=min_lr / peak)


SCHEDULERS = {'CosineWarmupScheduler': CosineWarmupScheduler, 'LinearWarmupScheduler': LinearWarmupScheduler,
              'default': DefaultScheduler}


def build_optimizer(optimizer_cls: Union[str, type, torch.optim.Optimizer], params: Iterable, **kwargs: Any):
    if isinstance(optimizer_cls, torch.optim.Optimizer):
        if kwargs:
            raise ValueError('an optimizer instance takes no keyword arguments')
        return optimizer_cls
    if isinstance(optimizer_cls, str):
        if optimizer_cls not in OPTIMIZERS:
            raise ValueError(f'unknown optimizer {optimizer_cls!r}; valid: {", ".join(OPTIMIZERS)} '
                             f'(or pass a class or an instance)')
        optimizer_cls = OPTIMIZERS[optimizer_cls]
    return optimizer_cls(params, **kwargs)


def build_scheduler(scheduler_cls: Union[str, Callable, Any], optimizer, **kwargs: Any):
    if isinstance(scheduler_cls, str):
        if scheduler_cls not in SCHEDULERS:
            raise ValueError(f'unknown scheduler {scheduler_cls!r}; valid: {", ".join(SCHEDULERS)} '
                             f'(or pass a class or an instance)')
        scheduler_cls = SCHEDULERS[scheduler_cls]
    if not callable(scheduler_cls):  # an instance, already bound to an optimizer
        return scheduler_cls
    return scheduler_cls(optimizer, **kwargs)


class MainParamsOptimizer(torch.optim.Optimizer):
    """An optimizer stepping fp32 main copies of half-precision weights (Megatron's mixed precision).

    AdamW on bf16 weights loses every update below bf16's resolution; here the inner optimizer
    (and its state) lives on fp32 copies, gradients are upcast before its step and the weights take
    the rounded result after it. fp32 parameters (a LoRA adapter) are their own main copies.
    Schedulers see the inner optimizer's ``param_groups``; ``state_dict`` carries the main copies,
    so a resume continues from them, not from the rounded weights."""

    def __init__(self, optimizer_cls, params: Iterable, **kwargs: Any):  # noqa: super().__init__ not wanted
        self.model_params = list(params)
        self.main_params = [p if p.dtype == torch.float32 else torch.nn.Parameter(p.detach().float())
                            for p in self.model_params]
        self.inner = build_optimizer(optimizer_cls, self.main_params, **kwargs)
        self.defaults = self.inner.defaults
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}

    @property
    def param_groups(self):
        return self.inner.param_groups

    @property
    def state(self):
        return self.inner.state

    def _copies(self):
        return [(model, main) for model, main in zip(self.model_params, self.main_params) if main is not model]

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError('MainParamsOptimizer.step takes no closure')
        for model, main in self._copies():
            main.grad = None if model.grad is None else model.grad.float()
        self.inner.step()
        for model, main in self._copies():
            model.copy_(main)
            main.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for parameter in self.model_params:
            parameter.grad = None

    def state_dict(self) -> dict:
        return {'inner': self.inner.state_dict(), 'main_params': [main.detach().clone() for _, main in self._copies()]}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        copies = self._copies()
        if len(state_dict['main_params']) != len(copies):
            raise ValueError(f'state_dict holds {len(state_dict["main_params"])} main copies, this optimizer has '
                             f'{len(copies)}: not the same parameters')
        self.inner.load_state_dict(state_dict['inner'])
        for (model, main), saved in zip(copies, state_dict['main_params']):
            main.copy_(saved)
            model.copy_(saved)
