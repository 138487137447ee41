"""Where every rank sits: named parallel dimensions over the ranks of a job.

A training script changes only ``DeviceMesh.from_sizes(...)`` to go from one device to many; the
rest of the library asks the mesh which data slice this rank reads (``data_rank``), which process
group a dimension communicates over (``group``), and hands FSDP the torch mesh (``to_torch``).
Ranks are laid out row-major over the dims in ``DIM_ORDER`` (the last dim varies fastest), so the
ranks that talk most (tp, then ulysses, cp) are neighbours, i.e. on the same host.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from twinkle.utils.process_state import RAY_DRIVER, process_state

# Outer to inner. dp and fsdp are always present (size 1 allowed) because FSDP slices them by name.
DIM_ORDER = ('pp', 'dp', 'fsdp', 'ep', 'cp', 'ulysses', 'tp')
# Ranks along these dims read different data. ep is one of them, as in Megatron and torchtitan: EP
# splits the data ranks (each reads its own tokens and sends them to the experts' owners), it does
# not add ranks that repeat a data slice.
DATA_DIMS = ('dp', 'fsdp', 'ep')
# Ranks along these split each sequence (context parallelism): they read the same data slice but
# hold different tokens of it, so tokens and losses sum over them too, and FSDP shards over them.
SEQUENCE_DIMS = ('cp', 'ulysses')
ALWAYS_PRESENT = ('dp', 'fsdp')

_CELL = 8  # column width of get_device_placement's drawing


@dataclass
class DeviceGroup:
    """A named set of ranks that components run on (``ranks=8`` means ranks 0..7)."""

    name: str
    ranks: Union[int, List[int]]
    device_type: Optional[str] = None

    def __post_init__(self):
        counted = isinstance(self.ranks, int) and not isinstance(self.ranks, bool)
        ranks = list(range(self.ranks)) if counted else list(self.ranks)
        if not ranks or not all(isinstance(rank, int) and rank >= 0 for rank in ranks):
            raise ValueError(f'ranks must be a positive count or a list of ranks, got {self.ranks!r}')
        self.ranks = ranks


@dataclass
class DeviceMesh:
    """Ranks arranged on named dims (``DeviceMesh({'dp': 2, 'fsdp': 4})``); see ``from_sizes``."""

    dims: Dict[str, int]
    device_type: Optional[str] = None
    _torch_mesh: object = field(default=None, init=False, repr=False, compare=False)
    _data_group: object = field(default=None, init=False, repr=False, compare=False)
    _loss_group: object = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        unknown = [name for name in self.dims if name not in DIM_ORDER]
        if unknown:
            raise ValueError(f'dims has unknown names {unknown}; valid: {", ".join(DIM_ORDER)}')
        for name, size in self.dims.items():
            _check_size(f'{name} size', size)
        given = dict(self.dims)
        for name in ALWAYS_PRESENT:
            given.setdefault(name, 1)
        self.dims = {name: given[name] for name in DIM_ORDER if name in given}

    @classmethod
    def from_sizes(cls, *, world_size: Optional[int] = None, dp_size: int = 1, fsdp_size: Optional[int] = None,
                   tp_size: Optional[int] = None, pp_size: Optional[int] = None, cp_size: Optional[int] = None,
                   ep_size: Optional[int] = None, ulysses_size: Optional[int] = None,
                   device_type: Optional[str] = None) -> 'DeviceMesh':
        """A mesh from per-dim sizes; ``world_size`` (when given) must be their product.

        Dims left at None or 1 are absent (``size`` answers 1), except dp and fsdp which always exist.
        """
        sizes = {'pp': pp_size, 'dp': dp_size, 'fsdp': fsdp_size, 'ep': ep_size, 'cp': cp_size,
                 'ulysses': ulysses_size, 'tp': tp_size}
        for name, size in sizes.items():
            if size is not None:
                _check_size(f'{name}_size', size)
        dims = {name: size for name, size in sizes.items() if size is not None and size > 1}
        mesh = cls(dims, device_type)
        if world_size is not None:
            _check_size('world_size', world_size)
            if mesh.world_size != world_size:
                raise ValueError(f'the mesh sizes {mesh.describe_sizes()} = {mesh.world_size} ranks '
                                 f'do not multiply to world_size={world_size}')
        return mesh

    # -- shape ------------------------------------------------------------------------------
    @property
    def dim_names(self) -> Tuple[str, ...]:
        return tuple(self.dims)

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.dims.values())

    @property
    def world_size(self) -> int:
        return math.prod(self.shape)

    def size(self, dim: str) -> int:
        """Ranks along ``dim`` (1 for a known dim this mesh does not use)."""
        if dim not in DIM_ORDER:
            raise ValueError(f'dim {dim!r} is not a mesh dim; valid: {", ".join(DIM_ORDER)}')
        return self.dims.get(dim, 1)

    def describe_sizes(self) -> str:
        """'dp_size=2 x fsdp_size=4' (dims of size 1 left out unless all are 1)."""
        shown = [f'{name}_size={size}' for name, size in self.dims.items() if size > 1]
        return ' x '.join(shown) or 'all sizes 1'

    # -- where this rank sits ---------------------------------------------------------------
    @property
    def rank(self) -> int:
        """This process's global rank (RANK before the process group exists, e.g. at mesh creation)."""
        return dist.get_rank() if dist.is_initialized() else process_state().global_rank()

    def coordinate(self, rank: Optional[int] = None) -> Dict[str, int]:
        """{dim: index} of ``rank`` (default: this rank)."""
        rank = self.rank if rank is None else rank
        if not 0 <= rank < self.world_size:
            raise ValueError(f'rank {rank} is outside this mesh of {self.world_size} ranks')
        coordinate = {}
        for name, size in reversed(self.dims.items()):
            rank, coordinate[name] = divmod(rank, size)
        return {name: coordinate[name] for name in self.dims}

    @property
    def data_world_size(self) -> int:
        """Ranks that read different data: dp x fsdp x ep (tp, cp, ulysses, pp ranks share a slice)."""
        return math.prod(self.size(name) for name in DATA_DIMS)

    @property
    def data_rank(self) -> int:
        """Which of the ``data_world_size`` data slices this rank reads (row-major over DATA_DIMS)."""
        return self.data_rank_of(self.rank)

    def data_rank_of(self, rank: int) -> int:
        """The data slice global ``rank`` reads (a Ray driver hands each actor its slice)."""
        coordinate = self.coordinate(rank)
        rank = 0
        for name in DATA_DIMS:
            rank = rank * self.size(name) + coordinate.get(name, 0)
        return rank

    @property
    def sequence_world_size(self) -> int:
        """Ranks that split one sequence: cp x ulysses."""
        return math.prod(self.size(name) for name in SEQUENCE_DIMS)

    @property
    def sequence_rank(self) -> int:
        """This rank's shard of each sequence (cp index x ulysses + ulysses index; see sequence_shards)."""
        coordinate = self.coordinate()
        return coordinate.get('cp', 0) * self.size('ulysses') + coordinate.get('ulysses', 0)

    @property
    def loss_world_size(self) -> int:
        """Ranks whose tokens together make the global batch: data ranks x sequence ranks."""
        return self.data_world_size * self.sequence_world_size

    # -- torch objects ------------------------------------------------------------------------
    def resolved_device_type(self) -> str:
        """``device_type`` or, when unset, the torch device type of the detected backend."""
        if self.device_type is not None:
            return self.device_type
        from twinkle import backends
        return backends.current().torch_device_type

    def to_torch(self):
        """The torch ``DeviceMesh`` with the same dim names (built on first use: it creates groups)."""
        if self._torch_mesh is None:
            if not dist.is_initialized():
                raise RuntimeError('the process group is not initialised: call twinkle.initialize() '
                                   'under torchrun before using the mesh for communication')
            if dist.get_world_size() != self.world_size:
                raise ValueError(f'the mesh has {self.world_size} ranks ({self.describe_sizes()}) '
                                 f'but the process group has {dist.get_world_size()}')
            from torch.distributed.device_mesh import DeviceMesh as TorchDeviceMesh
            ranks = torch.arange(self.world_size).reshape(self.shape)
            self._torch_mesh = TorchDeviceMesh(self.resolved_device_type(), ranks, mesh_dim_names=self.dim_names)
        return self._torch_mesh

    def group(self, dim: str):
        """The process group of this rank's neighbours along ``dim``."""
        if dim not in self.dims:
            raise ValueError(f'dim {dim!r} is not in this mesh (dims: {", ".join(self.dims)})')
        return self.to_torch().get_group(dim)

    def data_group(self):
        """The process group of the ranks that read different data and hold the same model slice
        (same tp, pp, cp, ulysses coordinates): tokens, losses and metrics reduce over it, never
        over the ranks that share a data slice. The whole world when every rank is a data rank."""
        if self._data_group is None:
            if self.data_world_size == self.world_size:
                self._data_group = dist.group.WORLD
            else:
                self._data_group = _group_along(self, DATA_DIMS)
        return self._data_group

    def loss_group(self):
        """The process group of the ranks whose tokens together make the global batch (data and
        sequence ranks with the same tp, pp coordinates): token counts, losses and metrics sum over it."""
        if self._loss_group is None:
            if self.sequence_world_size == 1:
                self._loss_group = self.data_group()
            elif self.loss_world_size == self.world_size:
                self._loss_group = dist.group.WORLD
            else:
                self._loss_group = _group_along(self, DATA_DIMS + SEQUENCE_DIMS)
        return self._loss_group

    def fsdp_mesh(self):
        """The torch mesh FSDP shards the (non-expert) parameters over: fsdp, ep, cp, ulysses (those
        present) flattened into one dim, with dp in front (HSDP: replicate over dp) when dp > 1."""
        return self._shard_mesh(('fsdp', 'ep', *SEQUENCE_DIMS))

    def expert_mesh(self):
        """The torch mesh of an expert-parallel rank's experts: the EP-complement (fsdp, cp,
        ulysses), the ranks holding the same experts; dp in front when dp > 1."""
        return self._shard_mesh(('fsdp', *SEQUENCE_DIMS))

    def _shard_mesh(self, shard_dims: Sequence[str]):
        torch_mesh = self.to_torch()
        present = tuple(dim for dim in shard_dims if self.size(dim) > 1) or ('fsdp',)
        name = '_'.join(present)
        if len(present) > 1:
            torch_mesh[present]._flatten(name)
        return torch_mesh[('dp', name)] if self.size('dp') > 1 else torch_mesh[name]

    def refuse_unapplied(self, applied: Sequence[str], owner: str, advice: Dict[str, str]) -> None:
        """Raise when a dim of size > 1 is one that ``owner`` does not apply: a mesh must never be
        accepted and then silently ignored (every rank would hold the whole model and repeat the
        others' work). ``advice`` says per dim what to use instead."""
        for name, size in self.dims.items():
            if size > 1 and name not in applied:
                raise ValueError(f'device_mesh has {name}_size={size}, which {owner} does not apply (it applies '
                                 f'{", ".join(applied)}): {advice.get(name, "leave it at 1")}')


def _group_along(mesh: DeviceMesh, dims: Sequence[str]):
    """This rank's group among the ranks that differ only along ``dims``. Every rank creates every
    such group, in the same order (``new_group`` is collective over the whole world)."""
    members: Dict[Tuple, List[int]] = {}
    for rank in range(mesh.world_size):
        where = mesh.coordinate(rank)
        members.setdefault(tuple(index for name, index in where.items() if name not in dims), []).append(rank)
    mine = None
    for ranks in members.values():
        group = dist.new_group(ranks)
        if mesh.rank in ranks:
            mine = group
    return mine


def _check_size(name: str, size) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f'{name} must be a positive int, got {size!r}')


def set_global_mesh(mesh: Optional[DeviceMesh]) -> None:
    """Record the job's mesh (``twinkle.initialize`` does this)."""
    process_state().mesh = mesh


def global_mesh() -> Optional[DeviceMesh]:
    """The mesh given to ``twinkle.initialize`` (None before it ran)."""
    return process_state().mesh


def get_device_placement(mesh: Optional[DeviceMesh] = None) -> str:
    """A drawing of the layout (default: the global mesh): one row per outer coordinate, ranks
    along the innermost dim, this process marked with ``*``."""
    mesh = mesh or global_mesh() or DeviceMesh({})
    me = -1 if process_state().role == RAY_DRIVER else mesh.rank  # a Ray driver is no rank of the mesh
    *outer, inner = [name for name, size in mesh.dims.items() if size > 1] or ['fsdp']
    rows: Dict[str, List[str]] = {}
    for rank in range(mesh.world_size):
        where = mesh.coordinate(rank)
        label = ' '.join(f'{name}{where[name]}' for name in outer)
        rows.setdefault(label, []).append(f'{rank}*' if rank == me else f'{rank} ')
    label_width = max(len(label) for label in rows)
    lines = [f'DeviceMesh {mesh.describe_sizes()}: {mesh.world_size} ranks on {mesh.resolved_device_type()}',
             ' ' * label_width + ''.join(f'{inner}{index} '.rjust(_CELL) for index in range(mesh.size(inner)))]
    lines += [label.ljust(label_width) + ''.join(cell.rjust(_CELL) for cell in cells)
              for label, cells in rows.items()]
    if 0 <= me < mesh.world_size:
        where = ' '.join(f'{name}={index}' for name, index in mesh.coordinate(me).items())
        lines.append(f'this process (*): rank {me} at {where}, data slice {mesh.data_rank} of {mesh.data_world_size}')
    return '\n'.join(lines)
