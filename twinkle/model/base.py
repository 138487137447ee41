"""The model component: the seeds' training API, whatever framework holds the model.

``TwinkleModel`` carries what every adapter shares -- one ``TrainState`` per trainable unit (the
full model, or each LoRA adapter), token-normalised gradient accumulation, the optimizer step and
schedule, metric reduction over the mesh's data ranks -- so ``TransformersModel`` and
``MegatronModel`` implement only how their framework loads, runs and shards a model (the hooks
at the end of the class).
"""
from __future__ import annotations

import abc
from typing import Any, Dict, Iterable, List, Optional, Union

import torch
import torch.distributed as dist

from twinkle.loss import LOSSES, Loss
from twinkle.loss.token_inputs import hand_out, token_inputs
from twinkle.model.optim import build_optimizer, build_scheduler
from twinkle.model.train_state import TrainState
from twinkle.parallel import all_reduce_sum, collective, scale_gradients_
from twinkle.utils.logger import get_logger
from twinkle.utils.remote import RemoteCapable, remote_method

logger = get_logger(__name__)

FULL_MODEL = ''  # the TrainState name used when no adapter is added


class TwinkleModel(RemoteCapable, abc.ABC):
    """``remote_group=`` (Ray mode) builds it on every rank of that group; the driver holds a proxy.

    A subclass sets ``device``, ``device_mesh``, ``distributed`` (more than one data rank),
    ``precision`` and ``model_id``, then calls ``_init_train_states()``."""

    def _init_train_states(self) -> None:
        self.template = None
        self.processor = None
        self._states: Dict[str, TrainState] = {}
        self._active = FULL_MODEL

    # -- set-up ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def add_adapter_to_model(self, adapter_name: str, config, gradient_accumulation_steps: int = 1) -> None: ...

    def set_optimizer(self, optimizer_cls='AdamW', adapter_name: Optional[str] = None, **kwargs) -> None:
        """``optimizer_cls``: a torch.optim name ('default' is AdamW), class or instance."""
        self._ensure_parallel()
        state = self._state(adapter_name)
        state.optimizer = self._build_optimizer(optimizer_cls, state.parameters, **kwargs)

    def _build_optimizer(self, optimizer_cls, parameters: List[torch.nn.Parameter], **kwargs):
        """The optimizer over ``parameters`` (an adapter may keep fp32 main copies of half weights)."""
        return build_optimizer(optimizer_cls, parameters, **kwargs)

    def set_lr_scheduler(self, scheduler_cls='CosineWarmupScheduler', adapter_name: Optional[str] = None,
                         **kwargs) -> None:
        """``scheduler_cls``: a name (see ``twinkle.model.optim.SCHEDULERS``), a callable or an instance."""
        state = self._state(adapter_name)
        if state.optimizer is None:
            raise RuntimeError('set_lr_scheduler needs an optimizer: call set_optimizer first')
        state.scheduler = build_scheduler(scheduler_cls, state.optimizer, **kwargs)

    def set_loss(self, loss_cls: Union[str, type, Loss] = 'CrossEntropyLoss', adapter_name: Optional[str] = None,
                 **kwargs) -> None:
        if isinstance(loss_cls, str):
            if loss_cls not in LOSSES:
                raise ValueError(f'unknown loss {loss_cls!r}; valid: {", ".join(LOSSES)} (or a Loss class/instance)')
            loss_cls = LOSSES[loss_cls]
        self._state(adapter_name).loss = loss_cls(**kwargs) if isinstance(loss_cls, type) else loss_cls

    def set_template(self, template='Template', **kwargs) -> None:
        from twinkle.template import build_template
        self.template = build_template(template, self.model_id, **kwargs)

    def set_processor(self, processor='InputProcessor', **kwargs) -> None:
        from twinkle.processor import InputProcessor
        if isinstance(processor, (str, type)):
            processor_cls = InputProcessor if isinstance(processor, str) else processor
            if self.template is not None:
                kwargs.setdefault('pad_token_id', self.template.pad_token_id)
            processor = processor_cls(**kwargs)
        self.processor = processor

    # -- compute --------------------------------------------------------------------------------
    @remote_method('slice', 'per_rank', sliced=('inputs',))
    def forward(self, inputs, adapter_name: Optional[str] = None):
        """Forward with autograd on (no backward); returns the model output of the last micro-batch."""
        state = self._state(adapter_name)
        self._ensure_parallel()
        self._train_mode(True)
        outputs = None
        for batch in self._batches(inputs):
            outputs = self._run(batch, state.loss)
        return outputs

    @remote_method('slice', 'per_rank', sliced=('inputs',))
    @torch.no_grad()
    def forward_only(self, inputs, adapter_name: Optional[str] = None):
        """Inference forward (logits built); updates the evaluation metrics when labels are given."""
        state = self._state(adapter_name)
        self._ensure_parallel()
        self._train_mode(False)
        outputs = None
        for batch in self._batches(inputs):
            outputs = self._run(batch, state.loss, want_loss=False)
            if 'labels' in batch or 'shift_labels' in batch:  # shift_labels: a sequence-sharded batch
                loss_sum, num_tokens = state.loss(batch, outputs)
                for metric in state.eval_metrics:
                    metric.update(loss_sum=loss_sum, num_tokens=num_tokens, inputs=batch, outputs=outputs)
        return outputs

    @remote_method('slice', 'mean_loss', sliced=('inputs', 'old_logps', 'advantages', 'ref_logps'))
    def forward_backward(self, inputs, adapter_name: Optional[str] = None,
                         micro_batch_size: Optional[int] = None, **loss_inputs) -> Dict[str, float]:
        """One step of gradient accumulation over ``inputs``: forward, loss sum, backward.

        ``micro_batch_size`` (samples) runs a list of samples as several micro-batches in this one
        call -- the same gradients, less activation memory (and what a pipeline schedule needs).
        ``loss_inputs`` (RL losses: ``old_logps``, ``advantages``, ``ref_logps``) are per-sample
        lists, laid onto the trained tokens of each micro-batch (``twinkle.loss.token_inputs``)."""
        state = self._state(adapter_name)
        self._ensure_parallel()
        self._train_mode(True)
        batches = [batch for chunk in _split(inputs, micro_batch_size) for batch in self._batches(chunk)]
        if loss_inputs:
            hand_out(token_inputs(inputs, loss_inputs), batches)
        loss_total, tokens_total = 0.0, 0
        for batch, outputs, loss_sum, num_tokens in self._forward_backward_batches(batches, state):
            for metric in state.train_metrics:
                metric.update(loss_sum=loss_sum, num_tokens=num_tokens, inputs=batch, outputs=outputs)
            loss_total += float(loss_sum.detach())
            tokens_total += int(num_tokens)
        state.pending_micro_batches += 1
        state.pending_tokens += tokens_total
        state.gradients_finalized = False
        return {'loss': loss_total / tokens_total if tokens_total else float('nan'), 'num_tokens': tokens_total}

    def _forward_backward_batches(self, batches: List[Dict[str, Any]], state: TrainState):
        """(batch, outputs, loss_sum, num_tokens) of each micro-batch, after its backward; one
        micro-batch at a time (a pipeline schedule overrides this)."""
        for batch in batches:
            with collective('forward_backward'):
                outputs = self._run(batch, state.loss)
                loss_sum, num_tokens = state.loss(batch, outputs)
                if not state.loss_unit:  # the window's first micro-batch: mean-sized losses in backward
                    state.loss_unit = self._mean_tokens_per_rank(num_tokens)
                scaled = loss_sum / state.loss_unit
                (state.scaler.scale(scaled) if state.scaler else scaled).backward()
            yield batch, outputs, loss_sum, num_tokens

    def clip_grad_norm(self, max_grad_norm: float = 1.0, adapter_name: Optional[str] = None) -> float:
        state = self._state(adapter_name)
        self._finalize_gradients(state)
        norm = float(self._clip_grad_norm(state.parameters, max_grad_norm))
        state.progress.update(grad_norm=norm)
        return norm

    def step(self, adapter_name: Optional[str] = None) -> bool:
        """One optimizer step over the accumulated gradients; returns whether it stepped.

        A window in which no rank trained a single token (every label ignored) is skipped with a
        warning, not stepped: its loss is undefined (0/0) and AdamW would still move the weights
        through weight decay and momentum. The skip is decided on the token count summed over all
        data ranks, so every rank skips together."""
        state = self._state(adapter_name)
        if state.optimizer is None:
            raise RuntimeError('step() needs an optimizer: call set_optimizer(...) first')
        if not state.pending_micro_batches:
            raise RuntimeError('step() with no gradients: call forward_backward(...) first (after zero_grad(), '
                               'step() has nothing to apply)')
        self._finalize_gradients(state)
        if not state.window_tokens:
            logger.warning('step skipped: the %d micro-batch(es) since the last step have no trained token (every '
                           'label is -100 on every rank); optimizer step %d not taken', state.pending_micro_batches,
                           state.optimizer_steps + 1)
            return False
        with collective('step'):
            if state.scaler is not None:
                state.scaler.step(state.optimizer)
                state.scaler.update()
            else:
                state.optimizer.step()
        state.optimizer_steps += 1
        state.progress.update(stepped=True, lr=state.optimizer.param_groups[0]['lr'])
        return True

    def zero_grad(self, adapter_name: Optional[str] = None) -> None:
        state = self._state(adapter_name)
        for parameter in state.parameters:
            parameter.grad = None
        state.pending_micro_batches, state.pending_tokens, state.loss_unit = 0, 0, 0
        state.gradients_finalized = False

    def lr_step(self, adapter_name: Optional[str] = None) -> None:
        state = self._state(adapter_name)
        if state.scheduler is not None:
            state.scheduler.step()

    def clip_grad_and_step(self, max_grad_norm: float = 1.0, adapter_name: Optional[str] = None) -> Optional[float]:
        """Clip, step, zero and advance the schedule once ``gradient_accumulation_steps`` micro-batches
        have accumulated; before that it does nothing and returns None."""
        state = self._state(adapter_name)
        if state.pending_micro_batches < state.gradient_accumulation_steps:
            return None
        norm = self.clip_grad_norm(max_grad_norm, adapter_name)
        stepped = self.step(adapter_name)
        self.zero_grad(adapter_name)
        if stepped:  # a skipped step does not advance the schedule either
            self.lr_step(adapter_name)
        return norm

    # -- reporting ------------------------------------------------------------------------------
    def calculate_metric(self, is_training: bool = True, adapter_name: Optional[str] = None) -> Dict[str, float]:
        """Numbers since the last call: loss, accuracy (when logits exist), grad norm, lr, tokens, tokens/s."""
        state = self._state(adapter_name)
        metrics = state.train_metrics if is_training else state.eval_metrics
        figures: Dict[str, float] = {}
        for metric in metrics:
            if self.distributed:
                metric.all_reduce(self._data_sum)
            figures.update(metric.compute())
            metric.reset()
        if is_training and state.optimizer is not None:
            figures['lr'] = state.optimizer.param_groups[0]['lr']
        return figures

    @abc.abstractmethod
    def get_train_configs(self, adapter_name: Optional[str] = None) -> Dict[str, Any]: ...

    # -- checkpoints ----------------------------------------------------------------------------
    @abc.abstractmethod
    def save(self, name: str, output_dir: Optional[str] = None, save_optimizer: bool = False,
             adapter_name: Optional[str] = None) -> str: ...

    @abc.abstractmethod
    def load(self, name: str, output_dir: Optional[str] = None, adapter_name: Optional[str] = None,
             load_optimizer: bool = False) -> None: ...

    def resume_from_checkpoint(self, checkpoint_dir: str, adapter_name: Optional[str] = None) -> None:
        """Weights, optimizer, scheduler, scaler, step count and RNG state, for an exact continuation."""
        self.load(checkpoint_dir, adapter_name=adapter_name, load_optimizer=True)

    # -- shared internals -----------------------------------------------------------------------
    def _state(self, adapter_name: Optional[str]) -> TrainState:
        name = self._active if adapter_name is None else adapter_name
        if name not in self._states:
            if name != FULL_MODEL:
                raise ValueError(f'unknown adapter {name!r}; added: {", ".join(self._states) or "none"}')
            self._states[name] = TrainState(FULL_MODEL, self._trainable_parameters(FULL_MODEL),
                                            scaler=self._new_scaler())
        if name:
            self._select_adapter(name)
        return self._states[name]

    def _new_scaler(self) -> Optional[torch.amp.GradScaler]:
        if not self.precision.use_grad_scaler:
            return None
        return torch.amp.GradScaler(self.device.torch_device_type)

    def _data_sum(self, value) -> torch.Tensor:
        """``value`` summed over the ranks whose tokens make the batch (the mesh's loss group: data
        ranks, and cp/ulysses ranks, which hold other tokens of the same rows), never over ranks that
        hold other slices of the same tokens (tp, pp)."""
        if self.device_mesh is None or not dist.is_initialized():
            return all_reduce_sum(value)
        return all_reduce_sum(value, group=self.device_mesh.loss_group())

    def _mean_tokens_per_rank(self, num_tokens) -> float:
        ranks = self.device_mesh.loss_world_size if self.distributed else 1
        return max(float(self._data_sum(num_tokens)) / ranks, 1.0)

    def _finalize_gradients(self, state: TrainState) -> None:
        """Reduce the gradients over the ranks that must see them (the framework's part), unscale fp16
        gradients, and turn the accumulated gradients into those of the mean over all tokens of the
        window and data ranks, once. (Backward ran on loss_sum / loss_unit, the first micro-batch's
        mean token count per rank, so fp16 gradients stay mean-sized.)"""
        if state.gradients_finalized:
            return
        self._reduce_gradients(state)
        if state.scaler is not None and state.optimizer is not None:
            state.scaler.unscale_(state.optimizer)
        total_tokens = float(self._data_sum(state.pending_tokens))  # over micro-batches and data ranks
        state.window_tokens = total_tokens
        if total_tokens:
            scale_gradients_(state.parameters, total_tokens / state.loss_unit)
        state.gradients_finalized = True

    # -- what each framework provides ----------------------------------------------------------
    @abc.abstractmethod
    def _trainable_parameters(self, adapter_name: str) -> List[torch.nn.Parameter]: ...

    @abc.abstractmethod
    def _batches(self, inputs) -> Iterable[Dict[str, Any]]:
        """Collated micro-batches on this rank's device (values checked once, here)."""

    @abc.abstractmethod
    def _run(self, batch: Dict[str, Any], loss: Loss, want_loss: bool = True):
        """The model's output for one micro-batch, in a form ``loss(batch, outputs)`` reads."""

    @abc.abstractmethod
    def _clip_grad_norm(self, parameters: List[torch.nn.Parameter], max_grad_norm: float) -> torch.Tensor:
        """Clip in place to the norm over every rank's shards (each counted once); returns the norm before."""

    @abc.abstractmethod
    def _train_mode(self, training: bool) -> None: ...

    def _ensure_parallel(self) -> None:
        """Shard the model once, before the first optimizer or forward (default: nothing to shard)."""

    def _select_adapter(self, name: str) -> None:
        """Make adapter ``name`` the one that forward runs."""

    def _reduce_gradients(self, state: TrainState) -> None:
        """Sum the gradients over the ranks that computed parts of them (default: already done, e.g. by FSDP)."""


def _split(inputs, micro_batch_size: Optional[int]):
    """``inputs`` as a list of inputs: lists of at most ``micro_batch_size`` samples, or whole when None."""
    if micro_batch_size is None:
        return [inputs]
    check_positive_int('micro_batch_size', micro_batch_size)
    if not isinstance(inputs, list):
        raise ValueError('micro_batch_size needs inputs as a list of samples (a collated batch is one micro-batch)')
    return [inputs[start:start + micro_batch_size] for start in range(0, len(inputs), micro_batch_size)]


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'{name} must be a positive int, got {value!r}')
