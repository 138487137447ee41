"""TransformersModel: a Hugging Face causal LM behind the seeds' training API.

At load it asks the device layer for dtype, loss scaling and attention, and applies twinkle's
kernels (``kernelize``). Training state lives per trainable unit (the full model, or each LoRA
adapter), so several adapters can train on one base model with their own optimizer, schedule,
loss and gradient accumulation.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Dict, Iterable, List, Optional, Union

import torch
from torch import nn

from twinkle import backends, hub
from twinkle.kernels import kernelize, report
from twinkle.loss import Loss
from twinkle.model.base import TwinkleModel, check_positive_int
from twinkle.model.precision import choose_attention, choose_precision
from twinkle.model.train_state import TrainState
from twinkle.parallel import (apply_expert_parallel, checkpoint_directory, clip_grad_norm_, global_mesh, load_sharded,
                              parallelize, recover_checkpoint, write_full_state_dict, write_sharded)
from twinkle.parallel.context_parallel import ulysses_kv_replicas
from twinkle.parallel.expert_checkpoint import shard_expert_state_dict
from twinkle.utils.logger import get_logger

from . import checkpoint
from .batches import model_inputs, to_batches

logger = get_logger(__name__)

SHARDED_STATE = 'sharded'  # subfolder of a checkpoint with the FSDP shards of model and optimizer
APPLIED_DIMS = ('dp', 'fsdp', 'ep', 'cp', 'ulysses')
UNAPPLIED_ADVICE = {
    'tp': 'tensor parallelism is MegatronModel\'s (twinkle.model.MegatronModel, through megatron-core)',
    'pp': 'pipeline parallelism is MegatronModel\'s (twinkle.model.MegatronModel, through megatron-core)',
}


class TransformersModel(TwinkleModel):
    """The seeds' training API over a Hugging Face ``*ForCausalLM``.

    Args:
        model_id: local path, ``ms://org/name`` or ``hf://org/name``.
        model_cls: class (or ``transformers`` class name) to load with; default AutoModelForCausalLM.
        config: build from this config instead of loading weights (``model_id`` then unused).
        device_mesh: the parallel layout (default: the mesh given to ``twinkle.initialize``). With
            ``ep_size > 1`` each rank keeps its share of every MoE layer's experts (at load, before
            adapters), and FSDP2 shards the rest over all data ranks. With ``cp_size`` /
            ``ulysses_size > 1`` every batch's sequences are split over those ranks (zigzag shards,
            ring / Ulysses attention), FSDP2 shards over them too, and losses sum over their
            tokens; outputs (logits) are this rank's shard.
        mixed_precision: 'auto' (ask the device), 'bf16', 'fp16' or 'fp32'.
        kernels: 'auto' (twinkle's choice per model family), a ``kernelize`` mapping, or None.
        attn_implementation: 'auto' (flash-attn 2 where supported, else SDPA) or an HF name.
    """

    def __init__(self, model_id: Optional[str] = None, *, model_cls=None, config=None, device_mesh=None,
                 mixed_precision: str = 'auto', kernels: Union[str, Dict, None] = 'auto',
                 attn_implementation: str = 'auto', **from_pretrained_kwargs):
        from_pretrained_kwargs.pop('remote_group', None)  # a Ray driver made a proxy instead (RemoteCapable)
        if model_id is None and config is None:
            raise ValueError('TransformersModel needs model_id or config')
        self.device = backends.current()
        self.device_mesh = device_mesh if device_mesh is not None else global_mesh()
        if self.device_mesh is not None:
            self.device_mesh.refuse_unapplied(APPLIED_DIMS, 'TransformersModel', UNAPPLIED_ADVICE)
        self.distributed = self.device_mesh is not None and self.device_mesh.loss_world_size > 1
        self.context_parallel = self.device_mesh is not None and self.device_mesh.sequence_world_size > 1
        self.model_id = model_id
        self.precision = choose_precision(self.device, mixed_precision)
        if self.distributed and self.precision.autocast_dtype is not None:
            # FSDP2 keeps fp32 shards and casts them for compute; no autocast on top.
            self.precision = dataclasses.replace(self.precision, param_dtype=torch.float32, autocast_dtype=None,
                                                 reason=self.precision.reason + ', FSDP2 mixed-precision policy')
        attention, attention_reason = (self._context_parallel_attention(attn_implementation) if self.context_parallel
                                       else choose_attention(self.device, self.precision, attn_implementation))
        logger.info('precision: %s (%s)%s', self.precision.name, self.precision.reason,
                    '; fp16 gradient scaler on' if self.precision.use_grad_scaler else '')
        logger.info('attention: %s (%s)', attention, attention_reason)
        self.model = self._load(model_id, model_cls, config, attention, from_pretrained_kwargs)
        if self.context_parallel:  # heads Ulysses cannot split: refused now, not in the first forward
            loaded = self._base_model().config
            ulysses_kv_replicas(loaded.num_attention_heads, getattr(loaded, 'num_key_value_heads', None)
                                or loaded.num_attention_heads, self.device_mesh.size('ulysses'))
        self.kernels = kernels
        self._apply_kernels(kernels)
        if self.device_mesh is not None and self.device_mesh.size('ep') > 1:
            apply_expert_parallel(self.model, self.device_mesh)  # before adapters: LoRA sees the local experts
        self._init_train_states()
        self._parallelized = False

    # -- set-up ---------------------------------------------------------------------------------
    def add_adapter_to_model(self, adapter_name: str, config, gradient_accumulation_steps: int = 1) -> None:
        """Add a LoRA (any peft config) named ``adapter_name``; it becomes the active adapter."""
        import peft
        if self._parallelized:
            raise RuntimeError('add adapters before the model is sharded (before set_optimizer or the first forward)')
        if adapter_name in self._states:
            raise ValueError(f'adapter {adapter_name!r} already exists')
        check_positive_int('gradient_accumulation_steps', gradient_accumulation_steps)
        if isinstance(self.model, peft.PeftModel):
            self.model.add_adapter(adapter_name, config)
        else:
            self.model = peft.get_peft_model(self.model, config, adapter_name=adapter_name)
        self.model.set_adapter(adapter_name)
        parameters = self._trainable_parameters(adapter_name)
        self._states[adapter_name] = TrainState(adapter_name, parameters, gradient_accumulation_steps,
                                                scaler=self._new_scaler())
        self._active = adapter_name
        logger.info('adapter %r added: %d trainable parameters, gradient accumulation %d', adapter_name,
                    sum(p.numel() for p in parameters), gradient_accumulation_steps)

    def get_train_configs(self, adapter_name: Optional[str] = None) -> Dict[str, Any]:
        state = self._state(adapter_name)
        used_ops = ({row['op']: f'{row["backend"]} ({row["reason"]})' for row in report(used_only=True)}
                    if self.kernels else {})
        return {
            'model_id': self.model_id, 'model_class': type(self._base_model()).__name__,
            'device': self.device.type, 'precision': self.precision.name,
            'attention': self._base_model().config._attn_implementation,
            'kernels': used_ops, 'adapter': state.name or None,
            'trainable_parameters': sum(p.numel() for p in state.parameters),
            'gradient_accumulation_steps': state.gradient_accumulation_steps,
            'optimizer': type(state.optimizer).__name__ if state.optimizer else None,
            'scheduler': type(state.scheduler).__name__ if state.scheduler else None,
            'loss': type(state.loss).__name__,
        }

    # -- checkpoints ----------------------------------------------------------------------------
    def save(self, name: str, output_dir: Optional[str] = None, save_optimizer: bool = False,
             adapter_name: Optional[str] = None) -> str:
        """Write a Hugging Face (full) or peft (adapter) checkpoint; returns its directory.

        The checkpoint is written whole into a staging directory and then replaces ``path`` in one
        step (under torchrun: the full weights and the ``sharded/`` resume state together), so a
        crash during the save leaves the previous checkpoint at ``path`` intact."""
        state = self._state(adapter_name)
        path = os.path.join(output_dir, name) if output_dir else name
        if self.distributed:
            self._ensure_parallel()
            with checkpoint_directory(path) as staging:
                write_full_state_dict(self.model, staging)
                if save_optimizer:
                    write_sharded(os.path.join(staging, SHARDED_STATE), self.model, state.optimizer,
                                  extra_state=state.trainer_state(include_optimizer=False))
            return path
        tokenizer = self.template.tokenizer if self.template is not None else None
        checkpoint.save(self.model, path, adapter=state.name or None, tokenizer=tokenizer,
                        trainer_state=state.trainer_state() if save_optimizer else None)
        logger.info('saved %s to %s', f'adapter {state.name!r}' if state.name else 'model', path)
        return path

    def load(self, name: str, output_dir: Optional[str] = None, adapter_name: Optional[str] = None,
             load_optimizer: bool = False, strict: bool = True) -> None:
        """Load a checkpoint of ``save`` in place. Missing or unexpected weights are an error unless
        ``strict=False`` (then logged); NaN/inf weights and damaged files are always refused."""
        state = self._state(adapter_name)
        path = os.path.join(output_dir, name) if output_dir else name
        if self.distributed:
            self._ensure_parallel()
            recover_checkpoint(path)
            if load_optimizer:
                self._require_sharded_state(path)
                state.load_trainer_state(load_sharded(os.path.join(path, SHARDED_STATE), self.model, state.optimizer))
            elif state.name:  # a full adapter (every expert): each rank takes its slices, peft shards the rest
                checkpoint.load(self.model, path, adapter=state.name, strict=strict,
                                prepare=lambda weights: shard_expert_state_dict(self.model, weights, state.name))
            else:
                raise NotImplementedError('under FSDP, load full weights with from_pretrained (model_id=path); '
                                          'load(load_optimizer=True) resumes a sharded checkpoint')
            return
        if load_optimizer and os.path.isdir(os.path.join(path, SHARDED_STATE)):  # saved on N ranks: DCP reshards
            state.load_trainer_state(load_sharded(os.path.join(path, SHARDED_STATE), self.model, state.optimizer))
            logger.info('resumed %s, a checkpoint of several ranks, in one process', path)
            return
        trainer_state = checkpoint.load(self.model, path, adapter=state.name or None, strict=strict)
        if load_optimizer:
            if trainer_state is None:
                raise ValueError(f'{path} holds no optimizer state (saved without save_optimizer=True)')
            state.load_trainer_state(trainer_state)

    def _require_sharded_state(self, path: str) -> None:
        """A one-process checkpoint keeps its optimizer state whole (``trainer_state.pt``), which
        cannot be sharded onto ranks; say so rather than that the directory is not a checkpoint."""
        recover_checkpoint(path)
        if os.path.isdir(os.path.join(path, SHARDED_STATE)):
            return
        if os.path.exists(os.path.join(path, checkpoint.TRAINER_STATE)):
            raise ValueError(f'{path} was saved by one process and is resumed on {self.device_mesh.data_world_size} '
                             f'ranks: the world size differs, and its optimizer state is whole, not sharded. Resume '
                             f'it in one process, or start from its weights (load() without load_optimizer)')
        raise ValueError(f'{path} holds no resume state (saved without save_optimizer=True)')

    # -- internals ------------------------------------------------------------------------------
    def _load(self, model_id, model_cls, config, attention, kwargs) -> nn.Module:
        import transformers
        if model_cls is None:
            model_cls = transformers.AutoModelForCausalLM
        elif isinstance(model_cls, str):
            model_cls = getattr(transformers, model_cls)
        kwargs.setdefault('dtype', self.precision.param_dtype)
        if model_id is not None:
            model = model_cls.from_pretrained(hub.model_dir(model_id), attn_implementation=attention, **kwargs)
        else:
            from_config = getattr(model_cls, 'from_config', None) or model_cls._from_config
            model = from_config(config, attn_implementation=attention, **kwargs)
        return model.to(self.device.local_device())

    def _ensure_parallel(self) -> None:
        """Shard over the mesh once, after adapters are added (FSDP2 replaces the parameters)."""
        if self._parallelized or not self.distributed:
            return
        mixed = None if self.precision.name == 'fp32' else self.precision.name
        parallelize(self.model, self.device_mesh, mixed_precision=mixed)
        for state in self._states.values():
            state.parameters = self._trainable_parameters(state.name)
        self._parallelized = True

    def _trainable_parameters(self, adapter_name: str) -> List[nn.Parameter]:
        marker = f'.{adapter_name}.'
        return [p for n, p in self.model.named_parameters() if p.requires_grad and (not adapter_name or marker in n)]

    def _select_adapter(self, name: str) -> None:
        if getattr(self.model, 'active_adapter', name) != name:
            self.model.set_adapter(name)

    def _clip_grad_norm(self, parameters: List[nn.Parameter], max_grad_norm: float) -> torch.Tensor:
        return clip_grad_norm_(parameters, max_grad_norm)

    def _train_mode(self, training: bool) -> None:
        self.model.train(training)

    def _apply_kernels(self, kernels) -> None:
        if kernels is None:
            logger.info('kernels: none (kernels=None): stock Hugging Face modules')
        elif kernels == 'auto':
            kernelize(self.model)
        elif isinstance(kernels, dict):
            kernelize(self.model, kernels)
        else:
            raise ValueError(f"kernels must be 'auto', a kernelize mapping or None, got {kernels!r}")

    def _context_parallel_attention(self, attn_implementation: str):
        """Sequence-sharded batches need attention that exchanges K/V (ring) or heads (Ulysses)."""
        from twinkle.parallel.context_parallel_model import HF_ATTENTION_NAME, register_hf_attention
        if attn_implementation not in ('auto', HF_ATTENTION_NAME):
            raise ValueError(f'attn_implementation={attn_implementation!r} cannot run context parallelism '
                             f'({self.device_mesh.describe_sizes()}): it attends within one rank\'s tokens only; '
                             f'use "auto" (twinkle\'s {HF_ATTENTION_NAME})')
        return register_hf_attention(), f'{self.device_mesh.describe_sizes()}: Ulysses / ring attention over shards'

    def _batches(self, inputs) -> Iterable[Dict[str, Any]]:
        vocab_size = getattr(self._base_model().config, 'vocab_size', None)
        batches = to_batches(inputs, self.processor, self.template, self.device.local_device(), vocab_size)
        if not self.context_parallel:
            return batches
        from twinkle.parallel.context_parallel_model import shard_batch
        return [shard_batch(batch, self.device_mesh) for batch in batches]

    def _run(self, batch: Dict[str, Any], loss: Loss, want_loss: bool = True):
        if 'cu_seq_lens_q' in batch:
            self._use_packed_attention()
        kwargs = model_inputs(batch)
        if want_loss and loss.model_computes_loss and 'labels' in batch:
            # num_items_in_batch=1 makes the model's loss a sum over tokens (HF and twinkle heads alike)
            kwargs.update(labels=batch['labels'], num_items_in_batch=1)
        elif want_loss and loss.model_computes_loss and 'shift_labels' in batch:  # sharded: twinkle's head fuses
            kwargs.update(shift_labels=batch['shift_labels'], num_items_in_batch=1)
        elif want_loss and loss.model_computes_logps and 'labels' in batch and self._head_is_kernelized():
            from twinkle.loss.policy_gradient import logps_targets
            kwargs.update(logps_of=logps_targets(batch), logps_temperature=loss.temperature)
        with self._autocast():
            return self.model(**kwargs)

    def _head_is_kernelized(self) -> bool:
        """``kernelize`` put twinkle's fused head in front of the causal LM (kernels='auto' or a mapping)."""
        from twinkle.kernels.causal_lm import TwinkleCausalLMLoss
        return isinstance(self._base_model(), TwinkleCausalLMLoss)

    def _use_packed_attention(self) -> None:
        """Packed (padding-free) rows need attention that stops at sequence boundaries: SDPA and
        eager would attend across them. flash-attn 2 reads cu_seq_lens itself; else twinkle_varlen."""
        from twinkle.kernels.varlen_attention import HF_ATTENTION_NAME, register_hf_attention
        base = self._base_model()
        current = base.config._attn_implementation
        if current in ('flash_attention_2', HF_ATTENTION_NAME):
            return
        base.set_attn_implementation(register_hf_attention())
        logger.info('attention: %s -> %s for packed batches (exact per-sequence attention)', current,
                    HF_ATTENTION_NAME)

    def _autocast(self):
        if self.precision.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.torch_device_type, dtype=self.precision.autocast_dtype)

    def _base_model(self) -> nn.Module:
        get_base = getattr(self.model, 'get_base_model', None)
        return get_base() if get_base is not None else self.model
