"""The model component's interface: what a training loop calls, whatever framework is underneath."""
from __future__ import annotations

import abc
from typing import Any, Dict, Optional


class TwinkleModel(abc.ABC):
    """Adapters (``TransformersModel``, later ``MegatronModel``) implement these; the seeds' loops
    call nothing else, so a loop written against one adapter runs on another."""

    @abc.abstractmethod
    def add_adapter_to_model(self, adapter_name: str, config, gradient_accumulation_steps: int = 1) -> None: ...

    @abc.abstractmethod
    def set_optimizer(self, optimizer_cls='AdamW', adapter_name: Optional[str] = None, **kwargs) -> None: ...

    @abc.abstractmethod
    def set_lr_scheduler(self, scheduler_cls='CosineWarmupScheduler', adapter_name: Optional[str] = None,
                         **kwargs) -> None: ...

    @abc.abstractmethod
    def set_loss(self, loss_cls='CrossEntropyLoss', adapter_name: Optional[str] = None, **kwargs) -> None: ...

    @abc.abstractmethod
    def forward_backward(self, inputs, adapter_name: Optional[str] = None) -> Dict[str, float]: ...

    @abc.abstractmethod
    def forward_only(self, inputs, adapter_name: Optional[str] = None) -> Any: ...

    @abc.abstractmethod
    def clip_grad_and_step(self, max_grad_norm: float = 1.0, adapter_name: Optional[str] = None): ...

    @abc.abstractmethod
    def calculate_metric(self, is_training: bool = True, adapter_name: Optional[str] = None) -> Dict[str, float]: ...

    @abc.abstractmethod
    def save(self, name: str, output_dir: Optional[str] = None, save_optimizer: bool = False,
             adapter_name: Optional[str] = None) -> str: ...

    @abc.abstractmethod
    def load(self, name: str, output_dir: Optional[str] = None, adapter_name: Optional[str] = None,
             load_optimizer: bool = False) -> None: ...
