"""What one trainable unit (the full model, or one LoRA adapter) carries between steps."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch

from twinkle.loss import CrossEntropyLoss, Loss
from twinkle.metric import Accuracy, LossMetric, TrainMetric
from twinkle.parallel import rng_state, set_rng_state


@dataclass
class TrainState:
    """Optimizer, schedule, loss and the gradient-accumulation bookkeeping of one adapter.

    Gradients accumulate as sums over tokens; ``pending_tokens`` counts the tokens behind them,
    so the step divides once by the true total (not a mean of per-micro-batch means)."""
    name: str
    parameters: List[torch.nn.Parameter]
    gradient_accumulation_steps: int = 1
    optimizer: Optional[torch.optim.Optimizer] = None
    scheduler: Any = None
    loss: Loss = field(default_factory=CrossEntropyLoss)
    scaler: Optional[torch.amp.GradScaler] = None
    pending_micro_batches: int = 0
    pending_tokens: int = 0
    loss_unit: int = 0  # backward divides the loss sums by this (the window's first micro-batch's tokens)
    gradients_finalized: bool = False
    window_tokens: float = 0.0  # trained tokens of the window over all data ranks (set when finalized)
    optimizer_steps: int = 0
    train_metrics: List[Any] = field(default_factory=lambda: [LossMetric(), Accuracy(), TrainMetric()])
    eval_metrics: List[Any] = field(default_factory=lambda: [LossMetric(), Accuracy()])

    @property
    def progress(self) -> TrainMetric:
        return next(m for m in self.train_metrics if isinstance(m, TrainMetric))

    def trainer_state(self, include_optimizer: bool = True) -> dict:
        """Everything but the weights that an exact resume needs (the optimizer's sharded state is
        saved separately under FSDP, hence ``include_optimizer``)."""
        return {
            'optimizer': self.optimizer.state_dict() if self.optimizer and include_optimizer else None,
            'scheduler': self.scheduler.state_dict() if self.scheduler else None,
            'scaler': self.scaler.state_dict() if self.scaler else None,
            'optimizer_steps': self.optimizer_steps,
            'rng': rng_state(),
        }

    def load_trainer_state(self, state: dict) -> None:
        setters = {'optimizer': 'set_optimizer()', 'scheduler': 'set_lr_scheduler()', 'scaler': 'fp16 training'}
        for key, needs in setters.items():
            if state.get(key) is None:
                continue
            target = getattr(self, key)
            if target is None:
                raise ValueError(f'the checkpoint holds {key} state; resuming it needs {needs} first')
            target.load_state_dict(state[key])
        self.optimizer_steps = state.get('optimizer_steps', 0)
        set_rng_state(state['rng'])
