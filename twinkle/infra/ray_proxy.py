"""The driver's stand-in for a component built on every rank of a Ray group.

A method call fans out to the group's actors by the method's ``CallRule``
(``twinkle.utils.remote``): the same arguments to every rank, or each data rank its contiguous
share of the per-sample arguments (the share a torchrun rank's DataLoader would have read, so a
Ray job and a torchrun job see the same batches). The answers are combined the way the torchrun
path would see them. With ``lazy_collect`` the call returns a ``LazyResult`` at once and the driver
waits only when the value is used; actors run calls in the order the driver made them.
"""
from __future__ import annotations

import inspect
import itertools
from typing import Any, Callable, Dict, List, Optional

from twinkle.utils.remote import call_rule

from .ray_cluster import GroupHandle, RayCluster

_handles = itertools.count(1)


class LazyResult:
    """A remote call's combined answer, fetched on first use (``result()``, or using it as the value)."""

    def __init__(self, resolve: Callable[[], Any], refs: List[Any]):
        self._resolve, self._refs, self._done, self._value, self._error = resolve, refs, False, None, None

    def result(self) -> Any:
        """The answer; a failed call raises its error here (again on every use)."""
        if not self._done:
            try:
                self._value = self._resolve()
            except BaseException as error:
                self._error = error
                raise
            finally:
                self._done = True
        if self._error is not None:
            raise self._error
        return self._value

    def __getattr__(self, name):
        if name.startswith('_'):
            raise AttributeError(name)
        return getattr(self.result(), name)

    def __getitem__(self, key):
        return self.result()[key]

    def __iter__(self):
        return iter(self.result())

    def __len__(self):
        return len(self.result())

    def __bool__(self):
        return bool(self.result())

    def __float__(self):
        return float(self.result())

    def __eq__(self, other):
        return self.result() == other

    __hash__ = None

    def __format__(self, spec):
        return format(self.result(), spec)

    def __repr__(self):
        return repr(self.result())


class RemoteComponent:
    """Proxy of ``cls(*args, **kwargs)`` built on each rank of ``group`` (or its first rank only,
    for classes with ``remote_on_first_rank_only``)."""

    is_remote_proxy = True

    def __init__(self, cluster: RayCluster, group: GroupHandle, cls: type, args: tuple, kwargs: dict):
        mesh = kwargs.get('device_mesh')
        if mesh is not None and getattr(mesh, 'world_size', group.size) != group.size and \
                not cls.remote_on_first_rank_only:
            raise ValueError(f'{cls.__name__}: device_mesh has {mesh.world_size} ranks ({mesh.describe_sizes()}) but '
                             f'remote_group {group.name!r} has {group.size}; size the mesh to its group')
        self._cluster, self._group, self._cls = cluster, group, cls
        self._handle = next(_handles)
        self._mesh = mesh if mesh is not None else group.mesh
        self._ranks = [0] if cls.remote_on_first_rank_only else list(range(group.size))
        kwargs = cls.remote_build_kwargs(dict(kwargs))
        self._wait(f'{cls.__name__}()', [group.actors[rank].build.remote(self._handle, cls, args, kwargs)
                                         for rank in self._ranks])

    @property
    def device_mesh(self):
        return self._mesh

    @property
    def remote_group(self) -> str:
        return self._group.name

    def __repr__(self):
        return f'<remote {self._cls.__name__} on group {self._group.name!r} ({len(self._ranks)} rank(s))>'

    def __getattr__(self, name: str):
        if name.startswith('_'):
            raise AttributeError(name)
        if not callable(getattr(self._cls, name, None)):
            return self._call_all('__getattribute__', (name,), {}, 'first')
        return lambda *args, **kwargs: self._method(name, args, kwargs)

    def __len__(self) -> int:
        return self._call_all('__len__', (), {}, 'first')

    def __iter__(self):
        """Items of the component's iterator, fetched from its first rank one at a time."""
        restart = True
        while True:
            done, item = self._wait('iteration', [self._actor(self._ranks[0]).next_item.remote(self._handle, restart)],
                                    ranks=self._ranks[:1])[0]
            if done:
                return
            restart = False
            yield item

    def remote_apply(self, function: Callable, *args, **kwargs) -> List[Any]:
        """``function(component, *args, **kwargs)`` on every rank; each rank's answer, in rank order."""
        refs = [self._actor(rank).apply.remote(self._handle, function, args, kwargs) for rank in self._ranks]
        return self._wait(getattr(function, '__name__', 'remote_apply'), refs)

    def sync_weights_into(self, sampler: 'RemoteComponent', merge_and_sync: bool,
                          adapter_name: Optional[str]) -> Dict[str, Any]:
        from .ray_weights import sync_between_groups
        return sync_between_groups(self, sampler, merge_and_sync, adapter_name)

    # -- internals --------------------------------------------------------------------------------
    def _actor(self, rank: int):
        self._cluster.settle()  # an earlier lazy call that failed fails this one, before it is sent
        return self._cluster.group(self._group.name).actors[rank]

    def _wait(self, what: str, refs, ranks: Optional[List[int]] = None) -> List[Any]:
        return self._cluster.gather(self._group, refs, what, ranks=ranks or self._ranks)

    def _method(self, name: str, args: tuple, kwargs: dict):
        rule = call_rule(self._cls, name)
        if rule.dispatch == 'slice':
            per_rank = _sliced_calls(getattr(self._cls, name), args, kwargs, rule.sliced, self._mesh, self._ranks)
        else:
            per_rank = [(args, kwargs)] * len(self._ranks)
        refs = [self._actor(rank).call.remote(self._handle, name, rank_args, rank_kwargs)
                for rank, (rank_args, rank_kwargs) in zip(self._ranks, per_rank)]
        resolve = lambda: _combine(rule.collect, self._wait(name, refs), self._mesh, self._ranks)  # noqa: E731
        if not self._cluster.lazy_collect:
            return resolve()
        return self._cluster.defer(LazyResult(resolve, refs))

    def _call_all(self, name: str, args: tuple, kwargs: dict, collect: str):
        refs = [self._actor(rank).call.remote(self._handle, name, args, kwargs) for rank in self._ranks]
        return _combine(collect, self._wait(name, refs), self._mesh, self._ranks)


def _sliced_calls(method: Callable, args: tuple, kwargs: dict, sliced, mesh, ranks: List[int]):
    """(args, kwargs) per rank: the per-sample arguments cut into each rank's data share."""
    bound = inspect.signature(method).bind(None, *args, **kwargs)  # None: self
    named = dict(bound.arguments)
    variadic = next((p.name for p in inspect.signature(method).parameters.values()
                     if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    extra = dict(named.pop(variadic, {})) if variadic else {}
    named.pop(next(iter(inspect.signature(method).parameters)))  # self
    calls = []
    for rank in ranks:
        data_rank = mesh.data_rank_of(rank) if mesh is not None else 0
        data_world = mesh.data_world_size if mesh is not None else 1
        rank_named = {key: _share(value, key, data_rank, data_world) if key in sliced else value
                      for key, value in named.items()}
        rank_extra = {key: _share(value, key, data_rank, data_world) if key in sliced else value
                      for key, value in extra.items()}
        calls.append(((), {**rank_named, **rank_extra}))
    return calls


def _share(value, name: str, rank: int, world: int):
    """Data rank ``rank``'s contiguous share of a per-sample argument (as the DataLoader cuts it)."""
    from twinkle.dataloader.dataloader import data_share
    if value is None:
        return None
    if isinstance(value, dict):
        return {key: _share(item, f'{name}[{key!r}]', rank, world) for key, item in value.items()}
    if not hasattr(value, '__len__') or not hasattr(value, '__getitem__'):
        raise ValueError(f'{name} must hold one entry per sample (a list, tuple or tensor) to be shared over '
                         f'the data ranks, got {type(value).__name__}')
    if len(value) < world:
        raise ValueError(f'{name} has {len(value)} samples for {world} data ranks: every data rank needs one')
    return data_share(value, rank, world)


def _combine(collect: str, answers: List[Any], mesh, ranks: List[int]):
    if collect == 'first':
        return answers[0]
    if collect == 'per_rank':
        return answers
    firsts = _first_rank_per_slice(mesh, ranks, sequence=collect == 'mean_loss')
    chosen = [answers[ranks.index(rank)] for rank in firsts]
    if collect == 'concat':
        return [item for answer in chosen for item in answer]
    tokens = sum(int(answer['num_tokens']) for answer in chosen)
    total = sum(float(answer['loss']) * int(answer['num_tokens']) for answer in chosen if answer['num_tokens'])
    return {'loss': total / tokens if tokens else float('nan'), 'num_tokens': tokens}


def _first_rank_per_slice(mesh, ranks: List[int], sequence: bool) -> List[int]:
    """One rank per data slice (per data slice and sequence shard with ``sequence``), in slice order:
    tp / pp ranks (and cp / ulysses ranks for whole answers) repeat their slice's answer."""
    if mesh is None:
        return ranks[:1]
    firsts: Dict[tuple, int] = {}
    for rank in ranks:
        where = mesh.coordinate(rank)
        key = (mesh.data_rank_of(rank),) + ((where.get('cp', 0), where.get('ulysses', 0)) if sequence else ())
        firsts.setdefault(key, rank)
    return [firsts[key] for key in sorted(firsts)]
