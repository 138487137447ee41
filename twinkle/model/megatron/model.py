"""MegatronModel: a Hugging Face causal LM rebuilt as megatron-core's GPTModel, behind the seeds' API.

The HF directory gives the config and the weights; ``bridge`` builds this rank's GPTModel slice
and ``bridge_keys`` cuts its tensors out of the checkpoint (and puts them back for ``save``).
Tensor parallelism (with sequence parallelism), pipeline parallelism (megatron-core's 1F1B
schedule), expert parallelism and data parallelism come from the ``DeviceMesh``; the training loop
is ``TwinkleModel``'s. What is Megatron-specific here is how
gradients meet (``_reduce_gradients``: sequence-parallel norms over tp, everything over the data
ranks, experts over their own data ranks) and how the gradient norm counts each shard once.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Any, Dict, Iterable, List, Optional

import torch
import torch.distributed as dist

from twinkle import backends, hub
from twinkle.loss import Loss
from twinkle.model.base import FULL_MODEL, TwinkleModel, check_positive_int
from twinkle.model.optim import MainParamsOptimizer
from twinkle.model.precision import choose_precision
from twinkle.model.train_state import TrainState
from twinkle.model.transformers.batches import to_batches
from twinkle.parallel.mesh import DeviceMesh
from twinkle.loss.base import count_tokens
from twinkle.parallel import collective, global_mesh
from twinkle.utils.labels import IGNORE_INDEX, shifted_labels
from twinkle.utils.logger import get_logger

from . import bridge, bridge_keys, checkpoint, head, lora, require_megatron
from .parallel_state import check_megatron_mesh, destroy_megatron_groups, initialize_megatron_groups

logger = get_logger(__name__)

GROUP_TIMEOUT = datetime.timedelta(minutes=10)


@dataclasses.dataclass
class MegatronOutput:
    """What ``Loss`` reads: ``loss`` (a sum over the micro-batch's trained tokens) or ``logits``
    (full vocabulary, gathered over tp; only built by ``forward_only``)."""
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None


class MegatronModel(TwinkleModel):
    """The seeds' training API over megatron-core (the ``megatron`` extra).

    Args:
        model_id: an HF model directory, ``ms://org/name`` or ``hf://org/name`` (Llama, Qwen2, Qwen3, Qwen3-MoE).
        device_mesh: tp, pp, dp, ep sizes; default: the mesh of ``twinkle.initialize``, else one process.
            With pp > 1, forward_backward runs the pipeline schedule; forward and forward_only
            through the pipeline are not built yet.
        mixed_precision: 'auto' (the device's default: fp32 on CPU), 'bf16' or 'fp32'. bf16 is
            Megatron's mixed precision: bf16 weights and compute, the optimizer on fp32 main copies
            (``MainParamsOptimizer``; LoRA adapters stay fp32). 'fp16' (loss scaling) is not built.
        seed: seeds Megatron's tensor-parallel RNG states and the LoRA initialisation.
        kernels: 'auto' -- the training loss through twinkle's vocab-parallel fused linear
            cross-entropy (no rank holds the tokens x vocab logits) -- or None for Megatron's output
            layer and ``vocab_parallel_cross_entropy`` (the logits of this rank's vocab shard).
    """

    def __init__(self, model_id: str, *, device_mesh: Optional[DeviceMesh] = None, mixed_precision: str = 'auto',
                 seed: int = 0, kernels: Optional[str] = 'auto', **kwargs):
        kwargs.pop('remote_group', None)  # a Ray driver made a proxy instead (RemoteCapable)
        if kwargs:
            raise TypeError(f'MegatronModel got unexpected arguments {sorted(kwargs)}')
        if kernels not in ('auto', None):
            raise ValueError(f"kernels must be 'auto' or None for MegatronModel, got {kernels!r}")
        require_megatron()
        self.device = backends.current()
        self.device_mesh = device_mesh or global_mesh() or DeviceMesh({})
        check_megatron_mesh(self.device_mesh)
        self.model_id = model_id
        self.model_dir = hub.model_dir(model_id)
        from transformers import AutoConfig
        self.hf_config = AutoConfig.from_pretrained(self.model_dir)
        self.sizes = {name: self.device_mesh.size(name) for name in ('tp', 'pp', 'ep')}
        self.arch = bridge.architecture(self.hf_config)
        bridge.check_parallel_sizes(self.arch, tp=self.sizes['tp'], pp=self.sizes['pp'], ep=self.sizes['ep'])
        self.precision = choose_precision(self.device, mixed_precision)
        if self.precision.name == 'fp16':
            raise NotImplementedError(f"mixed_precision={mixed_precision!r} resolves to fp16: MegatronModel has no "
                                      "loss scaling yet; use 'bf16' where the device has it, else 'fp32'")
        logger.info('MegatronModel precision: %s (%s)%s', self.precision.name, self.precision.reason,
                    ', fp32 main weights in the optimizer' if self.precision.name == 'bf16' else '')
        self.distributed = self.device_mesh.data_world_size > 1
        _ensure_process_group(self.device_mesh)
        initialize_megatron_groups(self.device_mesh, timeout=GROUP_TIMEOUT, seed=seed)
        self.device_mesh.data_group()  # created now, by every rank, not inside a training step
        self.layout = {**self.sizes, 'dp': self.device_mesh.data_world_size}
        self.lora_layers: List[lora.LoraParallelLinear] = []
        self.lora_configs: Dict[str, Any] = {}
        self.lora_settings: Dict[str, lora.LoraSettings] = {}
        self._adapter_parameters: Dict[str, List[torch.nn.Parameter]] = {}
        self.seed = seed
        self.model = self._build()
        self.fused_loss = kernels == 'auto'
        self.head = self._fuse_head() if self.fused_loss else None
        logger.info('MegatronModel loss: %s', self._loss_name())
        self.model.config.calculate_per_token_loss = True  # the pipeline schedule leaves our sums unscaled
        self._init_train_states()

    # -- set-up ---------------------------------------------------------------------------------
    def add_adapter_to_model(self, adapter_name: str, config, gradient_accumulation_steps: int = 1) -> None:
        """A LoRA (peft ``LoraConfig``: r, lora_alpha, lora_dropout, use_rslora, target_modules) on
        the attention and dense MLP projections, sharded like their weights; the base is frozen and
        the adapter becomes the active one."""
        if not isinstance(adapter_name, str) or not adapter_name:
            raise ValueError(f'adapter_name must be a non-empty str, got {adapter_name!r}')
        if adapter_name in self._states:
            raise ValueError(f'adapter {adapter_name!r} already exists')
        if FULL_MODEL in self._states:
            raise RuntimeError('add adapters before training the full model (before set_optimizer without one)')
        check_positive_int('gradient_accumulation_steps', gradient_accumulation_steps)
        settings = lora.lora_settings(config, moe=self.arch.num_experts > 0)
        if not self.lora_layers:
            self._wrap_linears()
        parameters = [p for layer in self.lora_layers for p in layer.add(adapter_name, settings, self.seed)]
        self.lora_configs[adapter_name], self.lora_settings[adapter_name] = config, settings
        self._adapter_parameters[adapter_name] = parameters
        self._states[adapter_name] = TrainState(adapter_name, parameters, gradient_accumulation_steps,
                                                scaler=self._new_scaler())
        self._active = adapter_name
        self._select_adapter(adapter_name)
        logger.info('adapter %r added: LoRA r=%d on %s, %d trainable parameters on this rank', adapter_name,
                    settings.rank, ', '.join(settings.targets), sum(p.numel() for p in parameters))

    def get_train_configs(self, adapter_name: Optional[str] = None) -> Dict[str, Any]:
        state = self._state(adapter_name)
        return {'model_id': self.model_id, 'model_class': 'megatron.core.GPTModel', 'device': self.device.type,
                'precision': self.precision.name, **{f'{name}_size': size for name, size in self.sizes.items()},
                'sequence_parallel': self.model.config.sequence_parallel,
                'loss': self._loss_name(), 'adapter': state.name or None,
                'trainable_parameters': sum(p.numel() for p in state.parameters),
                'optimizer': type(state.optimizer).__name__ if state.optimizer else None,
                'scheduler': type(state.scheduler).__name__ if state.scheduler else None}

    # -- checkpoints ----------------------------------------------------------------------------
    def save(self, name: str, output_dir: Optional[str] = None, save_optimizer: bool = False,
             adapter_name: Optional[str] = None) -> str:
        """The full model as Hugging Face safetensors, or the adapter as a peft checkpoint, gathered
        from every rank's slice; ``save_optimizer`` adds each rank's resume state. Collective."""
        state = self._state(adapter_name)
        path = os.path.join(output_dir, name) if output_dir else name
        checkpoint.save(self, path, state.name, trainer_state=state.trainer_state() if save_optimizer else None)
        return path

    def load(self, name: str, output_dir: Optional[str] = None, adapter_name: Optional[str] = None,
             load_optimizer: bool = False) -> None:
        """Weights of ``save``'s checkpoint (an HF directory, or a peft adapter for an adapter) into
        this rank's slices; ``load_optimizer`` resumes the optimizer, schedule and RNG too (same layout)."""
        state = self._state(adapter_name)
        path = os.path.join(output_dir, name) if output_dir else name
        if load_optimizer:
            state.load_trainer_state(checkpoint.load_resume_state(self, path, state.name))
        elif state.name:
            checkpoint.load_adapter(self, path, state.name)
        else:
            checkpoint.load_base_state(self.model, self._rank_state(hub.model_dir(path)))

    def close(self) -> None:
        """Forget megatron-core's process groups (another MegatronModel may then be built)."""
        destroy_megatron_groups()

    # -- the hooks of TwinkleModel --------------------------------------------------------------
    def _build_optimizer(self, optimizer_cls, parameters: List[torch.nn.Parameter], **kwargs):
        if all(p.dtype == torch.float32 for p in parameters) or isinstance(optimizer_cls, torch.optim.Optimizer):
            return super()._build_optimizer(optimizer_cls, parameters, **kwargs)
        return MainParamsOptimizer(optimizer_cls, parameters, **kwargs)

    def _trainable_parameters(self, adapter_name: str) -> List[torch.nn.Parameter]:
        if adapter_name:
            return self._adapter_parameters[adapter_name]
        return [p for p in self.model.parameters() if p.requires_grad]

    def _select_adapter(self, name: str) -> None:
        for layer in self.lora_layers:
            layer.active = name

    def _batches(self, inputs) -> Iterable[Dict[str, Any]]:
        batches = to_batches(inputs, self.processor, self.template, self.device.local_device(),
                             self.hf_config.vocab_size)
        for batch in batches:
            if 'cu_seq_lens_q' in batch:
                raise NotImplementedError('packed (padding-free) batches on MegatronModel are not built yet: '
                                          'use a processor that pads')
        lengths = [batch['input_ids'].shape[1] for batch in batches]
        if self.sizes['ep'] > 1:
            lengths = _common_lengths(lengths)
        return [_pad_sequence(batch, self.sizes['tp'], length) for batch, length in zip(batches, lengths)]

    def _run(self, batch: Dict[str, Any], loss: Loss, want_loss: bool = True) -> MegatronOutput:
        """Megatron's forward: vocab-parallel logits, and the loss summed over the trained tokens
        without ever gathering the vocabulary."""
        from megatron.core import tensor_parallel
        if self.sizes['pp'] > 1:
            raise NotImplementedError('with pp_size > 1 MegatronModel trains (forward_backward); forward and '
                                      'forward_only through the pipeline are not built yet')
        training = want_loss and 'labels' in batch
        logits = self._forward(self.model, batch, fused=training)
        if not training:
            full = tensor_parallel.gather_from_tensor_model_parallel_region(self._mask_padded_vocab(logits))
            return MegatronOutput(logits=full[..., :self.hf_config.vocab_size])
        return MegatronOutput(loss=self._loss_sum(logits, batch['labels']))

    def _forward(self, model: torch.nn.Module, batch: Dict[str, Any], fused: bool) -> torch.Tensor:
        """GPTModel on one micro-batch; ``fused``: it returns the hidden states the fused head loss
        reads (on the last stage), not logits."""
        if self.head is not None:
            self.head.fused = fused
        try:
            return model(batch['input_ids'], _position_ids(batch), _attention_mask(batch))
        finally:
            if self.head is not None:
                self.head.fused = False

    def _loss_sum(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy summed over the trained tokens: from the hidden states through
        the fused head, or from vocab-parallel logits through Megatron's cross-entropy."""
        if self.head is not None:
            return head.loss_sum(self.head, output, labels, self.hf_config.vocab_size)
        from megatron.core import tensor_parallel
        logits = output
        labels = shifted_labels(labels)
        trained = labels != IGNORE_INDEX
        per_token = tensor_parallel.vocab_parallel_cross_entropy(self._mask_padded_vocab(logits).float(),
                                                                 labels.masked_fill(~trained, 0))
        return (per_token * trained).sum()

    def _forward_backward_batches(self, batches: List[Dict[str, Any]], state):
        """With pp > 1 megatron-core's 1F1B schedule runs the micro-batches through the stages
        (activations and their gradients travel by p2p); the last stage computes the losses, which
        are then broadcast over the pipeline group so that every stage reports the same metrics."""
        if self.sizes['pp'] == 1:
            yield from super()._forward_backward_batches(batches, state)
            return
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func
        batches = _same_shape(batches, self.sizes['tp'])
        counts = [count_tokens(batch['labels']) for batch in batches]
        if not state.loss_unit:
            state.loss_unit = self._mean_tokens_per_rank(counts[0])
        sums = []

        def forward_step(iterator, model):
            batch = next(iterator)
            output = self._forward(model, batch, fused=True)

            def loss_func(logits):
                loss_sum = self._loss_sum(logits, batch['labels'])
                sums.append(loss_sum.detach())
                return loss_sum / state.loss_unit, count_tokens(batch['labels']).int(), {}
            return output, loss_func

        with collective('forward_backward'):
            get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter(batches), model=[self.model],
                num_microbatches=len(batches), seq_length=batches[0]['input_ids'].shape[1],
                micro_batch_size=batches[0]['input_ids'].shape[0], forward_only=False)
            losses = torch.stack(sums) if sums else torch.zeros(len(batches))
            dist.broadcast(losses, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                           group=parallel_state.get_pipeline_model_parallel_group())
        for batch, loss_sum, num_tokens in zip(batches, losses, counts):
            yield batch, MegatronOutput(loss=loss_sum), loss_sum, num_tokens

    def _clip_grad_norm(self, parameters: List[torch.nn.Parameter], max_grad_norm: float) -> torch.Tensor:
        """The 2-norm over the whole model: a weight copied on every tp rank counts once (tp rank
        0's), a sharded one by its shards; dense shards meet over tp x pp, experts over their
        expert-model-parallel group."""
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate
        squares = {True: torch.zeros((), dtype=torch.float32), False: torch.zeros((), dtype=torch.float32)}
        for parameter in parameters:
            if parameter.grad is None or getattr(parameter, 'shared', False):  # the last stage's tied copy
                continue
            if param_is_not_tensor_parallel_duplicate(parameter):
                squares[_is_expert(parameter)] += parameter.grad.float().pow(2).sum()
        dist.all_reduce(squares[False], group=parallel_state.get_model_parallel_group())
        dist.all_reduce(squares[True], group=parallel_state.get_expert_tensor_model_pipeline_parallel_group())
        norm = (squares[False] + squares[True]).sqrt()
        coefficient = torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0)
        for parameter in parameters:
            if parameter.grad is not None:
                parameter.grad.mul_(coefficient)
        return norm

    def _reduce_gradients(self, state) -> None:
        """Sum each gradient over the ranks that computed a part of it: a tied embedding over its
        first- and last-stage copies, sequence-parallel norm weights over tp (each rank saw its
        share of the tokens), dense weights over the data ranks, expert weights over the data ranks
        that hold the same experts."""
        from megatron.core import parallel_state
        groups = {'tp': parallel_state.get_tensor_model_parallel_group(),
                  'dense': parallel_state.get_data_parallel_group(),
                  'expert': parallel_state.get_expert_data_parallel_group()}
        for parameter in state.parameters:
            if parameter.grad is None:
                continue
            if getattr(parameter, 'shared_embedding', False) and self.sizes['pp'] > 1:
                # a tied embedding lives on the first and the last stage: both copies take the sum
                dist.all_reduce(parameter.grad, group=parallel_state.get_embedding_group())
            if getattr(parameter, 'sequence_parallel', False) and self.sizes['tp'] > 1:
                dist.all_reduce(parameter.grad, group=groups['tp'])
            data_group = groups['expert' if _is_expert(parameter) else 'dense']
            if dist.get_world_size(data_group) > 1:
                dist.all_reduce(parameter.grad, group=data_group)

    def _train_mode(self, training: bool) -> None:
        self.model.train(training)

    # -- internals ------------------------------------------------------------------------------
    def _build(self) -> torch.nn.Module:
        config = bridge.transformer_config(self.hf_config, tp=self.sizes['tp'], pp=self.sizes['pp'],
                                           ep=self.sizes['ep'], sequence_parallel=self.sizes['tp'] > 1,
                                           params_dtype=self.precision.param_dtype,
                                           device_type=self.device.torch_device_type)
        from megatron.core import parallel_state
        model = bridge.gpt_model(self.hf_config, config, pp_rank=parallel_state.get_pipeline_model_parallel_rank())
        checkpoint.load_base_state(model, self._rank_state(self.model_dir))
        return model.to(self.device.local_device())

    def _fuse_head(self) -> Optional[head.FusedHead]:
        """The fused head loss in place of the output layer (only the last pipeline stage has one)."""
        if getattr(self.model, 'output_layer', None) is None:
            return None
        self.model.output_layer = head.FusedHead(self.model.output_layer, sequence_parallel=self.sizes['tp'] > 1)
        return self.model.output_layer

    def _loss_name(self) -> str:
        if self.fused_loss:
            return "twinkle vocab-parallel fused linear cross-entropy (kernels='auto': no tokens x vocab logits)"
        return 'megatron output layer + vocab_parallel_cross_entropy (kernels=None)'

    def _wrap_linears(self) -> None:
        """LoRA wrappers around this stage's projections, the base frozen (once, at the first adapter)."""
        from megatron.core import parallel_state
        self.model.requires_grad_(False)
        offset = bridge.stage_layers(self.arch.num_layers, pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
                                     pp_size=self.sizes['pp']).start
        self.lora_layers = lora.wrap_linears(
            self.model, num_heads=self.arch.num_heads, num_kv_heads=self.arch.num_kv_heads,
            head_dim=self.arch.head_dim, layer_offset=offset, tp_size=self.sizes['tp'],
            tp_rank=parallel_state.get_tensor_model_parallel_rank(), sequence_parallel=self.sizes['tp'] > 1)

    def _rank_state(self, model_dir: str) -> Dict[str, torch.Tensor]:
        from megatron.core import parallel_state
        return bridge_keys.hf_to_mcore(bridge_keys.load_hf_state_dict(model_dir), self.hf_config,
                                       tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                                       tp_size=self.sizes['tp'],
                                       pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
                                       pp_size=self.sizes['pp'],
                                       ep_rank=parallel_state.get_expert_model_parallel_rank(),
                                       ep_size=self.sizes['ep'])

    def _mask_padded_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """-inf for the zero rows Megatron's vocab-parallel layers pad the vocabulary with (when tp
        does not divide it), so that they take no probability mass."""
        vocab = self.hf_config.vocab_size
        per_rank = logits.shape[-1]
        from megatron.core import parallel_state
        start = parallel_state.get_tensor_model_parallel_rank() * per_rank
        if start + per_rank <= vocab:
            return logits
        column = torch.arange(start, start + per_rank, device=logits.device)
        return logits.masked_fill(column >= vocab, float('-inf'))


_PADS = {'input_ids': 0, 'labels': IGNORE_INDEX, 'attention_mask': 0}


def _position_ids(batch: Dict[str, Any]) -> torch.Tensor:
    position_ids = batch.get('position_ids')
    if position_ids is None:
        input_ids = batch['input_ids']
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    return position_ids


def _same_shape(batches: List[Dict[str, Any]], multiple: int) -> List[Dict[str, Any]]:
    """The pipeline's p2p buffers have one shape per call: every micro-batch padded to the
    longest, and all of the same number of rows (micro_batch_size must divide the samples)."""
    rows = {batch['input_ids'].shape[0] for batch in batches}
    if len(rows) > 1:
        raise ValueError(f'with pp_size > 1 every micro-batch needs the same number of samples, got {sorted(rows)}: '
                         f'choose a micro_batch_size that divides the samples of each forward_backward call')
    longest = max(batch['input_ids'].shape[1] for batch in batches)
    return [_pad_sequence(batch, multiple, longest) for batch in batches]


def _common_lengths(lengths: List[int]) -> List[int]:
    """The longest length of each micro-batch over the expert-parallel group: its all-gather
    dispatcher exchanges equal-sized token blocks, so every rank pads to the same length (one
    host read per call, where the batch is built). Every rank must run as many micro-batches."""
    from megatron.core import parallel_state
    group = parallel_state.get_expert_model_parallel_group()
    counts = torch.tensor([len(lengths), -len(lengths)])
    dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=group)
    if counts[0] != -counts[1]:
        raise ValueError(f'the expert-parallel ranks got {int(-counts[1])} to {int(counts[0])} micro-batches in '
                         f'this call: give every data rank the same number of samples (and micro_batch_size)')
    longest = torch.tensor(lengths)
    dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=group)
    return longest.tolist()


def _pad_sequence(batch: Dict[str, Any], multiple: int, length: int) -> Dict[str, Any]:
    """Right-pad the sequence to ``length`` rounded up to a multiple of ``multiple`` (sequence
    parallelism splits it over the tp ranks): pad ids, ignored labels, masked keys, positions
    counting on."""
    extra = -(-length // multiple) * multiple - batch['input_ids'].shape[1]
    if not extra:
        return batch
    padded = dict(batch)
    if 'attention_mask' not in batch:
        padded['attention_mask'] = torch.ones_like(batch['input_ids'])
    for key, value in _PADS.items():
        if key in padded:
            padded[key] = torch.nn.functional.pad(padded[key], (0, extra), value=value)
    if 'position_ids' in batch:
        tail = batch['position_ids'][:, -1:] + torch.arange(1, extra + 1, device=batch['position_ids'].device)
        padded['position_ids'] = torch.cat([batch['position_ids'], tail], dim=1)
    return padded


def _attention_mask(batch: Dict[str, Any]) -> torch.Tensor:
    """megatron-core's mask: bool [b or 1, 1, s, s], True where a query may not look -- later
    positions, and padding keys where the batch has an attention_mask."""
    input_ids = batch['input_ids']
    length = input_ids.shape[1]
    blocked = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).triu(1)[None, None]
    padding = batch.get('attention_mask')
    if padding is not None:
        blocked = blocked | (padding == 0)[:, None, None, :]
    return blocked


def _is_expert(parameter: torch.nn.Parameter) -> bool:
    """Megatron marks expert weights ``allreduce=False``: they are not copies across the data ranks."""
    return not getattr(parameter, 'allreduce', True)


def _ensure_process_group(mesh: DeviceMesh) -> None:
    """megatron-core needs torch.distributed even in one process: a one-rank gloo group then."""
    if dist.is_initialized():
        return
    if mesh.world_size != 1:
        raise RuntimeError(f'device_mesh has {mesh.world_size} ranks but no process group exists: launch with '
                           f'torchrun --nproc_per_node={mesh.world_size} and call twinkle.initialize()')
    dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1, timeout=GROUP_TIMEOUT)
    logger.info('MegatronModel: one process, a one-rank gloo process group for megatron-core')
