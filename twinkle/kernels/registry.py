"""Which implementation of each op runs where.

Every op registers its backends (``reference``, ``triton``, ``cpu``, ``npu``, ``liger``, ...)
with what each needs: device families, importable packages (and the pip extra that brings
them) and an optional capability check. ``select`` walks a per-device priority list and takes
the first available backend; an override (``backend=`` on the call, ``configure(...)``, or
``TWINKLE_KERNELS="op=backend,..."``) forces one and fails loudly if it cannot run. Every
choice is logged once with its reason, so a fallback is never silent.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from twinkle import backends
from twinkle.backends import Backend, has_package
from twinkle.utils.logger import get_logger
from twinkle.utils.process_state import process_state

logger = get_logger(__name__)

ANY_DEVICE = '*'
ENV_OVERRIDES = 'TWINKLE_KERNELS'

CapabilityCheck = Callable[[Backend], Optional[str]]
DeviceLike = Union[None, str, torch.device]


class KernelUnavailableError(RuntimeError):
    """A backend exists but cannot run here (missing package or capability)."""


@dataclass(frozen=True)
class Impl:
    """One backend of one op: the module holding it and what it needs to run."""
    module: str                              # submodule of twinkle.kernels.<op>
    devices: Tuple[str, ...] = (ANY_DEVICE,)  # device families it runs on
    packages: Tuple[str, ...] = ()            # importable packages it needs
    extra: Optional[str] = None               # pip extra that provides them
    check: Optional[CapabilityCheck] = None   # returns why it cannot run, or None


@dataclass
class Op:
    name: str
    impls: Dict[str, Impl]
    priority: Dict[str, List[str]]             # device family -> backends, best first
    package: str                               # the package holding the backend modules
    functions: Dict[str, Callable] = field(default_factory=dict)

    def order(self, device_type: str) -> List[str]:
        return self.priority.get(device_type, self.priority.get(ANY_DEVICE, ['reference']))


class Selection(NamedTuple):
    backend: str
    reason: str


_OPS: Dict[str, Op] = {}
_env_cache: Tuple[Optional[str], Dict[str, str]] = (None, {})


def _chosen() -> Dict[Tuple[str, str, str], Selection]:
    """(op, device type, override) -> the selection; per process state, like the device it depends on."""
    return process_state().cache('kernels.chosen')


def _configured() -> Dict[str, str]:
    """What ``configure()`` forced in this process."""
    return process_state().cache('kernels.configured')


def register(name: str, impls: Union[Sequence[str], Dict[str, Union[str, Impl]]],
             priority: Optional[Dict[str, Sequence[str]]] = None, *, package: Optional[str] = None,
             **custom: Impl) -> None:
    """Declare an op: the one helper every op uses, so the common backends are written once.

    ``impls`` names backends: a name of ``STANDARD`` takes its shared declaration, an ``Impl``
    (in a dict, or as a keyword: ``cpu=native.CPU``) declares one of the op's own. ``priority``
    defaults to ``DEFAULT_PRIORITY`` without the backends the op lacks; ``package`` (default
    ``twinkle.kernels.<name>``) holds one module per backend, each defining a function ``name``.
    Every op must have a 'reference' backend: the oracle and the fallback."""
    named = dict(impls) if isinstance(impls, dict) else {backend: backend for backend in impls}
    named.update(custom)
    impls = {}
    for backend, impl in named.items():
        if isinstance(impl, str):
            if impl not in STANDARD:
                raise ValueError(f'op {name!r}: {impl!r} is not a standard backend ({", ".join(STANDARD)}); '
                                 f'declare it with an Impl')
            impl = STANDARD[impl]
        impls[backend] = impl
    if priority is None:
        priority = {device: [b for b in names if b in impls] for device, names in DEFAULT_PRIORITY.items()}
    if 'reference' not in impls:
        raise ValueError(f'op {name!r} must register a "reference" backend')
    for backend, impl in impls.items():
        if impl.packages and not impl.extra:
            raise ValueError(f'op {name!r}: backend {backend!r} needs {", ".join(impl.packages)} but names no '
                             f'pip extra that installs it')
    for device, names in priority.items():
        unknown = [b for b in names if b not in impls]
        if unknown:
            raise ValueError(f'op {name!r}: priority for {device!r} names unknown backends {unknown}')
    _OPS[name] = Op(name, impls, {d: list(p) for d, p in priority.items()}, package or f'twinkle.kernels.{name}')
    for key in [key for key in _chosen() if key[0] == name]:
        del _chosen()[key]


def ops() -> List[str]:
    return sorted(_OPS)


def backends_of(op: str) -> List[str]:
    return list(_op(op).impls)


def declaration(op: str, backend: str) -> Impl:
    """What ``backend`` of ``op`` needs (devices, packages, extra)."""
    return _impl(op, backend)


def module_of(op: str, backend: str) -> str:
    """The dotted module holding ``backend`` of ``op``."""
    return f'{_op(op).package}.{_impl(op, backend).module}'


def unavailable_reason(op: str, backend: str, device: DeviceLike = None) -> Optional[str]:
    """None when ``backend`` of ``op`` can run on ``device``, else why not (naming the fix)."""
    impl = _impl(op, backend)
    target = _backend_for(device)
    if ANY_DEVICE not in impl.devices and target.type not in impl.devices:
        return f'runs on {"/".join(impl.devices)}, not {target.type}'
    missing = [p for p in impl.packages if not has_package(p)]
    if missing:
        hint = f': pip install "twinkle[{impl.extra}]"' if impl.extra else ''
        return f'needs {", ".join(missing)}{hint}'
    if impl.check is not None:
        return impl.check(target)
    return None


def select(op: str, device: DeviceLike = None) -> Selection:
    """The backend ``op`` uses on ``device`` (default: the current device) and why."""
    device_type = _backend_for(device).type
    override = _overrides().get(op)
    key = (op, device_type, override or '')
    if key not in _chosen():
        _chosen()[key] = _choose(op, device, device_type, override)
    return _chosen()[key]


def resolve(op: str, backend: Optional[str] = None, device: DeviceLike = None,
            variant: Optional[str] = None) -> Callable:
    """The function implementing ``op``: the forced ``backend`` or the selected one. A ``variant``
    (e.g. 'inplace') is the backend module's function ``<op>_<variant>``; a backend without one
    gives its plain function, and says so once in the log."""
    return _op(op).functions[_loaded_backend(op, backend, device, variant)]


@torch.compiler.assume_constant_result
def _loaded_backend(op: str, backend: Optional[str], device: DeviceLike, variant: Optional[str] = None) -> str:
    """Choose (or check) the backend, import its module and return the key of the function to call.
    torch.compile runs this once while tracing and keeps the answer, so an op's first call may be
    inside a compiled graph: device detection and imports are not traceable."""
    if backend is None:
        backend = select(op, device).backend
    else:
        _require_available(op, backend, device, why='backend=')
    _load(op, backend)
    if variant is None:
        return backend
    key = f'{backend}:{variant}'
    entry = _op(op)
    if key not in entry.functions:
        found = getattr(importlib.import_module(module_of(op, backend)), f'{op}_{variant}', None)
        if found is None:
            logger.info('kernel %s: backend %s has no %s variant; its plain function runs', op, backend, variant)
        entry.functions[key] = found or entry.functions[backend]
    return key


def configure(overrides: Optional[Dict[str, str]] = None, **kwargs: str) -> None:
    """Force backends for the whole run: ``configure(rms_norm='reference')``.
    ``configure()`` with no arguments clears what was configured (the environment still counts)."""
    merged = dict(overrides or {}, **kwargs)
    for op, backend in merged.items():
        _impl(op, backend)
    if not merged:
        _configured().clear()
    _configured().update(merged)
    _chosen().clear()


def report(device: DeviceLike = None, used_only: bool = False) -> List[dict]:
    """Per op: the chosen backend, the reason, and every backend's availability. ``used_only``:
    only the ops something has selected so far in this process (what a model actually runs)."""
    used = {key[0] for key in _chosen()}
    rows = []
    for name in ops():
        if used_only and name not in used:
            continue
        chosen = select(name, device)
        rows.append({
            'op': name,
            'backend': chosen.backend,
            'reason': chosen.reason,
            'backends': {b: unavailable_reason(name, b, device) or 'available' for b in backends_of(name)},
        })
    return rows


def triton_check(target: Backend) -> Optional[str]:
    """Capability check shared by every Triton backend."""
    if os.environ.get('TRITON_INTERPRET') == '1':
        return None  # the interpreter runs kernels on CPU tensors (tests)
    if not target.has_triton:
        return (f'Triton kernels need a CUDA GPU of sm70+ with triton; {target.type} has none '
                f'(TRITON_INTERPRET=1 runs them on CPU for testing)')
    return None


# The backends most ops declare alike (an op's backend module is named like its backend).
REFERENCE = Impl('reference')
CPU = Impl('cpu', devices=('cpu',))
TRITON = Impl('triton', packages=('triton',), extra='triton', check=triton_check)
LIGER = Impl('liger', packages=('liger_kernel', 'triton'), extra='liger', check=triton_check)
NPU = Impl('npu', devices=('npu',), packages=('torch_npu',), extra='npu')
STANDARD = {'reference': REFERENCE, 'cpu': CPU, 'triton': TRITON, 'liger': LIGER, 'npu': NPU}
DEFAULT_PRIORITY = {
    'cuda': ['triton', 'liger', 'reference'],
    'npu': ['npu', 'reference'],
    'cpu': ['cpu', 'reference'],
    ANY_DEVICE: ['reference'],
}


# -- internals ------------------------------------------------------------------------------

def _op(name: str) -> Op:
    if name not in _OPS:
        raise ValueError(f'unknown kernel op {name!r}; valid: {", ".join(ops())}')
    return _OPS[name]


def _impl(op: str, backend: str) -> Impl:
    entry = _op(op)
    if backend not in entry.impls:
        raise ValueError(f'unknown backend {backend!r} for op {op!r}; valid: {", ".join(entry.impls)}')
    return entry.impls[backend]


def _backend_for(device: DeviceLike) -> Backend:
    if device is None:
        return backends.current()
    if isinstance(device, str) and device in backends.FAMILIES:
        return backends.get(device)
    return backends.get(torch.device(device).type)


def _overrides() -> Dict[str, str]:
    global _env_cache
    raw = os.environ.get(ENV_OVERRIDES, '')
    if raw != _env_cache[0]:
        parsed = {}
        for item in filter(None, (part.strip() for part in raw.split(','))):
            op, sep, backend = item.partition('=')
            if not sep:
                raise ValueError(f'{ENV_OVERRIDES}: expected "op=backend", got {item!r}')
            _impl(op.strip(), backend.strip())
            parsed[op.strip()] = backend.strip()
        _env_cache = (raw, parsed)
    return {**_env_cache[1], **_configured()}


def _require_available(op: str, backend: str, device: DeviceLike, why: str) -> None:
    reason = unavailable_reason(op, backend, device)
    if reason is not None:
        raise KernelUnavailableError(f'{op}: backend {backend!r} (forced by {why}) cannot run on '
                                     f'{_backend_for(device).type}: {reason}')


def _choose(op: str, device: DeviceLike, device_type: str, override: Optional[str]) -> Selection:
    if override:
        source = 'configure()' if op in _configured() else ENV_OVERRIDES
        _require_available(op, override, device, why=source)
        selection = Selection(override, f'forced by {source}')
        logger.info('kernel %s on %s: %s (%s)', op, device_type, selection.backend, selection.reason)
        return selection
    skipped = []
    for backend in _op(op).order(device_type):
        reason = unavailable_reason(op, backend, device)
        if reason is None:
            break
        skipped.append(f'{backend} unavailable: {reason}')
    else:
        backend = 'reference'
    if skipped:
        selection = Selection(backend, 'fallback; ' + '; '.join(skipped))
        logger.warning('kernel %s on %s: %s (%s)', op, device_type, backend, selection.reason)
    else:
        selection = Selection(backend, f'first in {device_type} priority')
        logger.info('kernel %s on %s: %s (%s)', op, device_type, backend, selection.reason)
    return selection


def _load(op: str, backend: str) -> Callable:
    entry = _op(op)
    if backend not in entry.functions:
        module = importlib.import_module(module_of(op, backend))
        entry.functions[backend] = getattr(module, op)
    return entry.functions[backend]
