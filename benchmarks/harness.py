"""Shared benchmark machinery: time and measure an op's variants, and the machine's physical limits.

A variant is ``eager`` (the op's reference backend), ``compile`` (``torch.compile`` of it) or the
name of a twinkle backend. It runs on the device ``twinkle.backends.current()`` names
(``TWINKLE_DEVICE``, which ``run.py --device`` sets): the bench modules build their workloads on the
CPU and the harness moves them there; times wait for the device's queued work, peak memory is the
device's (VmHWM on CPU, ``torch.cuda.max_memory_allocated`` on CUDA).
Each (case, variant) runs in a fresh process (``python harness.py SPEC``):
its peak memory is then its own (no allocator cache or compiled code left by another variant), and a process started with ``TWINKLE_CPU_TUNING=0`` shows what the CPU tuning buys.
The limits (copy bandwidth, GEMM rate, cost of faulting in fresh pages) are measured by the runner
just before each case, so every ratio compares numbers taken side by side.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import AbstractSet, Callable, Dict, List, Optional, Sequence

import torch

BENCH_DIR = Path(__file__).resolve().parent
MIB = 2 ** 20
PAGE_BYTES = 4096


@dataclasses.dataclass(frozen=True)
class Settings:
    """How hard to measure: warm-up steps, then reps filling ``budget_s`` within [min, max]."""
    warmup: int
    min_reps: int
    max_reps: int
    budget_s: float
    copy_mib: int   # size of the bandwidth probe: well above the last-level cache
    gemm_n: int     # size of the GEMM-rate probe (n x n x n, fp32)


SETTINGS = {
    'quick': Settings(warmup=2, min_reps=3, max_reps=5, budget_s=1.0, copy_mib=256, gemm_n=1024),
    'default': Settings(warmup=2, min_reps=5, max_reps=20, budget_s=10.0, copy_mib=512, gemm_n=2048),
}
SETTINGS['full'] = SETTINGS['default']


@dataclasses.dataclass
class Workload:
    """One op call ready to run: positional args of the op's backend functions (the contract every
    backend shares), the tensors whose gradients backward fills, and the upstream gradients
    (None when the op returns a scalar loss)."""
    args: tuple
    leaves: Sequence[torch.Tensor]
    grad_outputs: Optional[Sequence[torch.Tensor]] = None
    before_step: Optional[Callable[[], None]] = None  # untimed, before every step: restores donated inputs


def on_device(work: Workload, device: torch.device) -> Workload:
    """``work`` with its tensors and modules on ``device``. Leaves stay leaves, a moved module's
    parameters replace the old ones among them, so backward fills the ``.grad`` the timing clears."""
    moved = {}  # id of a tensor on the CPU -> its copy (or a module's parameter) on the device

    def move(value):
        if isinstance(value, torch.nn.Module):
            before = list(value.parameters())
            value.to(device)  # in place, or with new parameters (torch decides per device)
            moved.update({id(old): new for old, new in zip(before, value.parameters())})
            return value
        if not isinstance(value, torch.Tensor) or value.device == device:
            return value
        if id(value) not in moved:
            moved[id(value)] = value.detach().to(device).requires_grad_(value.requires_grad)
        return moved[id(value)]

    args = tuple(move(value) for value in work.args)  # modules first: their parameters are leaves
    grads = None if work.grad_outputs is None else [move(grad) for grad in work.grad_outputs]
    return dataclasses.replace(work, args=args, leaves=[move(leaf) for leaf in work.leaves], grad_outputs=grads)


# -- variants -------------------------------------------------------------------------------

@contextlib.contextmanager
def _without_triton_interpreter():
    """Availability as the measuring processes see it: they never run the Triton interpreter."""
    saved = os.environ.pop('TRITON_INTERPRET', None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ['TRITON_INTERPRET'] = saved


def load_op(op: str):
    """The kernel registry with ``op`` registered (importing its package registers it)."""
    importlib.import_module(f'twinkle.kernels.{op}')
    from twinkle.kernels import registry
    return registry


def variants(op: str, wanted: AbstractSet[str] = frozenset()) -> Dict[str, Optional[str]]:
    """Every variant of ``op`` -> None when it runs here, else why it is skipped. With ``wanted``,
    the others are not even checked (a check may build native code)."""
    registry = load_op(op)
    found: Dict[str, Optional[str]] = {}
    with _without_triton_interpreter():
        for variant in (['eager', 'compile'] + [b for b in registry.backends_of(op) if b != 'reference']
                        + _backend_variants(op)):
            if wanted and variant not in wanted:
                found[variant] = 'not asked for (--variants)'
            elif variant in ('eager', 'compile'):
                found[variant] = None
            else:
                found[variant] = registry.unavailable_reason(op, variant.split(':')[0])
    return found


def _backend_variants(op: str) -> list:
    """A bench module's ``BACKEND_VARIANTS``, e.g. 'cpu:inplace' (the backend's ``<op>_inplace``)."""
    return list(getattr(importlib.import_module(f'bench_{op}'), 'BACKEND_VARIANTS', ()))


def make_variant(op: str, variant: str) -> Callable:
    """The function a variant times. A bench module whose variants are not registry backends
    builds them itself (its ``make_variant``)."""
    bench = importlib.import_module(f'bench_{op}')
    if hasattr(bench, 'make_variant'):
        return bench.make_variant(variant)
    registry = load_op(op)
    if variant == 'eager':
        return registry.resolve(op, 'reference')
    if variant == 'compile':
        return torch.compile(registry.resolve(op, 'reference'), dynamic=False)
    backend, _, backend_variant = variant.partition(':')
    return registry.resolve(op, backend, variant=backend_variant or None)


# -- timing ---------------------------------------------------------------------------------

def median_ms(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` on the current device, waiting for its queued work (CUDA's is asynchronous)."""
    from twinkle import backends
    synchronize = backends.current().synchronize
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _step(fn: Callable, work: Workload, device) -> tuple:
    """One forward + backward, timed apart: (forward s, backward s). Gradients start from None,
    as after ``zero_grad(set_to_none=True)``, so every step allocates them afresh."""
    _clear_grads(work)
    if work.before_step is not None:
        work.before_step()
    device.synchronize()
    start = time.perf_counter()
    outputs = fn(*work.args)
    device.synchronize()
    middle = time.perf_counter()
    torch.autograd.backward(outputs, work.grad_outputs)
    device.synchronize()
    return middle - start, time.perf_counter() - middle


def _clear_grads(work: Workload) -> None:
    for leaf in work.leaves:
        leaf.grad = None


def _release_free_memory() -> None:
    """Return freed heap to the OS (glibc keeps it resident), so the measured step's high-water
    mark counts what it allocates rather than what the warm-up left cached."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL('libc.so.6').malloc_trim(0)


def measure_variant(op: str, case: dict, variant: str, settings: Settings) -> dict:
    """In this (fresh) process: warm up, one fwd+bwd for peak memory, then the timed reps."""
    from twinkle import backends
    device = backends.current()        # applies the process tuning before any large allocation
    tuning = device.tune_process()
    bench = importlib.import_module(f'bench_{op}')
    make_work = getattr(bench, 'workload_for', None)  # a workload that depends on the variant
    work = on_device(make_work(case, variant) if make_work else bench.workload(case), device.local_device())
    fn = make_variant(op, variant)
    for _ in range(settings.warmup):   # torch.compile compiles here
        last = sum(_step(fn, work, device))
    _clear_grads(work)
    _release_free_memory()
    device.reset_peak_memory()
    baseline = device.peak_memory()    # resident set-up: inputs, upstream grads, compiled code
    _step(fn, work, device)
    peak = device.peak_memory()
    reps = max(settings.min_reps, min(settings.max_reps, int(settings.budget_s / max(last, 1e-6))))
    forward, backward = zip(*(_step(fn, work, device) for _ in range(reps)))
    return {
        'fwd_ms': statistics.median(forward) * 1e3,
        'bwd_ms': statistics.median(backward) * 1e3,
        'fwd_bwd_ms': statistics.median(f + b for f, b in zip(forward, backward)) * 1e3,
        'reps': reps,
        'peak_mib': peak / MIB,
        'peak_above_setup_mib': (peak - baseline) / MIB,
        'threads': torch.get_num_threads(),
        'tuning': tuning,
    }


def run_variant(op: str, case: dict, variant: str, settings: Settings, tuning: bool = True) -> dict:
    """``measure_variant`` in a fresh process; a failure is recorded, not raised (one broken
    backend must not sink the run). ``tuning=False`` starts it with ``TWINKLE_CPU_TUNING=0``."""
    from twinkle.backends.cpu import applied_tuning
    env = dict(os.environ)
    env.pop('TRITON_INTERPRET', None)
    for name in applied_tuning():  # what our tuning set here: the child decides for itself
        env.pop(name, None)
    if not tuning:
        env['TWINKLE_CPU_TUNING'] = '0'
    spec = json.dumps({'op': op, 'case': case, 'variant': variant, 'settings': dataclasses.asdict(settings)})
    done = subprocess.run([sys.executable, str(BENCH_DIR / 'harness.py'), spec],
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {'error': done.stderr.strip().splitlines()[-1] if done.stderr.strip() else
                f'exit code {done.returncode}'}
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- physical limits ------------------------------------------------------------------------
# Measured where the variants run: on an accelerator the runner makes it torch's default device,
# so these probes and the bench modules' GEMMs-alone timings allocate there.

def copy_gb_s(settings: Settings) -> float:
    """Copy bandwidth: bytes read + written per second, copying into a pre-faulted buffer."""
    source = torch.rand(settings.copy_mib * MIB // 4)
    target = torch.empty_like(source)
    target.copy_(source)  # fault the destination in: the probe measures bandwidth only
    return 2 * source.nbytes / median_ms(lambda: target.copy_(source), reps=settings.min_reps) / 1e6


def gemm_gflop_s(settings: Settings) -> float:
    """fp32 GEMM rate of an n x n x n product into a pre-faulted output."""
    n = settings.gemm_n
    a, b = torch.randn(n, n), torch.randn(n, n)
    product = torch.mm(a, b)
    return 2 * n ** 3 / median_ms(lambda: torch.mm(a, b, out=product), reps=settings.min_reps) / 1e6


def fresh_pages_ms(nbytes: Sequence[int], reps: int) -> float:
    """Allocating the outputs and touching each page once: the page-fault cost any
    implementation pays for outputs it does not reuse."""
    def allocate_and_touch():
        for size in nbytes:
            torch.empty(size, dtype=torch.uint8)[::PAGE_BYTES].fill_(1)
    return median_ms(allocate_and_touch, reps)


def bandwidth_limit(bytes_moved: int, output_bytes: List[int], settings: Settings) -> dict:
    """Elementwise ops: the bytes they must read and write, at the copy bandwidth measured now
    (just before the case: on a shared machine the rate drifts during a run)."""
    rate = copy_gb_s(settings)
    return _limit(output_bytes, settings, kind='bandwidth', bytes_moved=bytes_moved, copy_gb_s=rate,
                  limit_ms=bytes_moved / rate / 1e6)


def compute_limit(flops: int, output_bytes: List[int], settings: Settings, **extra) -> dict:
    """GEMM-bound ops: their FLOPs at the GEMM rate measured now."""
    rate = gemm_gflop_s(settings)
    return _limit(output_bytes, settings, kind='compute', flops=flops, gemm_gflop_s=rate,
                  limit_ms=flops / rate / 1e6, **extra)


def _limit(output_bytes: List[int], settings: Settings, **limit) -> dict:
    """A limit plus, apart, the cost of faulting in the outputs' fresh pages."""
    return {**limit, 'output_mib': sum(output_bytes) / MIB,
            'fault_ms': fresh_pages_ms(output_bytes, settings.min_reps)}


def nbytes(*specs: tuple) -> List[int]:
    """Byte sizes of (shape, dtype) pairs, for outputs that do not exist yet."""
    return [torch.Size(shape).numel() * dtype.itemsize for shape, dtype in specs]


if __name__ == '__main__':
    spec = json.loads(sys.argv[1])
    result = measure_variant(spec['op'], spec['case'], spec['variant'], Settings(**spec['settings']))
    print(json.dumps(result))


def whole_job_main(name: str, description: str, measure: Callable[[bool], dict], argv=None) -> dict:
    """Command line of a whole-job benchmark (packing, expert parallel): ``--quick``, ``--out``;
    writes ``results/training/<name>[-quick].json`` and refreshes RESULTS.md."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('--quick', action='store_true')
    parser.add_argument('--out', type=Path, default=BENCH_DIR)
    args = parser.parse_args(argv)
    result = measure(args.quick)
    path = args.out / 'results' / 'training' / f'{name}{"-quick" if args.quick else ""}.json'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    import run as runner
    runner.write_report(args.out)
    return result
