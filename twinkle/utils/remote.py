"""How a component says it can run in a Ray group: ``remote_group=`` and per-method call rules.

The component layer must not import the Ray layer above it, so this module only records: a class
deriving from ``RemoteCapable`` returns, when built with ``remote_group=`` in a Ray driver, whatever
the process state's ``proxy_factory`` (set by ``twinkle.initialize(mode='ray')``) makes of it (a proxy); ``@remote_method``
says how a method's call is spread over the group's ranks and how their answers are combined.
Outside a Ray driver ``remote_group`` is ignored: the seeds' scripts keep it under torchrun.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from .logger import get_logger
from .process_state import RAY_DRIVER, process_state

logger = get_logger(__name__)

DISPATCHES = ('all', 'slice')
# first: rank 0's answer (the ranks agree: metrics are already reduced over the data ranks);
# concat: the data ranks' lists joined in data-rank order; per_rank: every rank's answer;
# mean_loss: {'loss', 'num_tokens'} combined as one token-weighted mean over the data ranks.
COLLECTS = ('first', 'concat', 'per_rank', 'mean_loss')


@dataclass(frozen=True)
class CallRule:
    dispatch: str = 'all'          # all: every rank gets the call; slice: each data rank its share
    collect: str = 'first'
    sliced: Tuple[str, ...] = ()   # the arguments that hold one entry per sample


DEFAULT_RULE = CallRule()


def remote_method(dispatch: str = 'all', collect: str = 'first', sliced: Tuple[str, ...] = ()):
    """Mark a method's call rule: ``@remote_method('slice', 'concat', sliced=('prompts',))``."""
    if dispatch not in DISPATCHES:
        raise ValueError(f'dispatch must be one of {DISPATCHES}, got {dispatch!r}')
    if collect not in COLLECTS:
        raise ValueError(f'collect must be one of {COLLECTS}, got {collect!r}')
    if (dispatch == 'slice') != bool(sliced):
        raise ValueError("dispatch='slice' names the sliced arguments (sliced=...), and only it does")

    def mark(method: Callable) -> Callable:
        method.__twinkle_call_rule__ = CallRule(dispatch, collect, tuple(sliced))
        return method
    return mark


def call_rule(cls: type, name: str) -> CallRule:
    """The rule of ``cls.name``, inherited: a subclass overriding a marked method keeps its rule."""
    for klass in cls.__mro__:
        rule = getattr(klass.__dict__.get(name), '__twinkle_call_rule__', None)
        if rule is not None:
            return rule
    return DEFAULT_RULE


class RemoteCapable:
    """Mixin: ``Cls(..., remote_group='name')`` in a Ray driver returns a proxy of an instance built
    on each rank of that group; anywhere else it builds the instance here and ignores the name."""

    remote_on_first_rank_only = False  # True: one instance, on the group's first rank (a DataLoader)

    @classmethod
    def remote_build_kwargs(cls, kwargs: dict) -> dict:
        """The constructor's keyword arguments as the group's ranks receive them."""
        return kwargs

    def __new__(cls, *args, remote_group: Optional[str] = None, **kwargs):
        if remote_group is not None:
            state = process_state()
            if state.role == RAY_DRIVER and state.proxy_factory is not None:
                return state.proxy_factory(cls, remote_group, args, kwargs)
            logger.debug('%s: remote_group=%r ignored outside a Ray driver', cls.__name__, remote_group)
        return super().__new__(cls)
