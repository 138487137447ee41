"""The benchmark runner: ``python benchmarks/run.py [--quick] [--full] [--ops a,b] [--variants a,b] [--device cuda]``.

For every case of every op: the physical limits, then each variant in a fresh process; then it
writes ``results/<machine>[-quick].json`` (ops measured by earlier runs are kept until re-measured),
then regenerates ``RESULTS.md`` and the plots from every ``results/*.json`` (``--report-only`` does
just that). One bench_<op>.py per op
says what to run; they can also be run alone (``python benchmarks/bench_swiglu.py --quick``).
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import traceback
from pathlib import Path
from typing import List, Optional

import torch

import harness
import report

from twinkle.backends import FAMILIES

OPS = ('rms_norm', 'swiglu', 'rope', 'fused_linear_cross_entropy',
       'moe')  # each has a bench_<op>.py; make bench and make gpu-check run these
ALL_OPS = OPS + ('fused_linear_logprobs',)  # --ops also takes these (their bench_<op>.py runs them alone)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument('--quick', action='store_true', help='small shapes and few reps (about 2 minutes)')
    size.add_argument('--full', action='store_true', help='add the large shapes (FLCE N=4096 H=1024)')
    parser.add_argument('--ops', default=','.join(OPS), help='comma-separated, of ' + ','.join(ALL_OPS))
    parser.add_argument('--variants', default='', help='only these variants (eager,compile,<backend>,...)')
    parser.add_argument('--out', type=Path, default=harness.BENCH_DIR, help='where RESULTS.md and results/ go')
    parser.add_argument('--device', choices=sorted(FAMILIES),
                        help='measure on this device family (default: the detected one); sets TWINKLE_DEVICE')
    parser.add_argument('--note', default='', help='a sentence about the run, shown in RESULTS.md')
    parser.add_argument('--report-only', action='store_true', help='measure nothing: redo RESULTS.md and plots')
    args = parser.parse_args(argv)
    args.ops = [op.strip() for op in args.ops.split(',') if op.strip()]
    unknown = [op for op in args.ops if op not in ALL_OPS]
    if unknown:
        parser.error(f'unknown ops {unknown}; valid: {", ".join(ALL_OPS)}')
    args.variants = {v.strip() for v in args.variants.split(',') if v.strip()}
    args.size = 'quick' if args.quick else 'full' if args.full else 'default'
    return args


def machine_facts(device) -> dict:
    """A host-independent id (cpu-<cores>c-<capability>, or the accelerator's name) and facts."""
    from twinkle.backends.cpu import usable_cores
    cores = usable_cores()
    if device.type == 'cpu':
        ident = f'cpu-{cores}c-{torch.backends.cpu.get_cpu_capability().lower()}'
    else:
        ident = f'{device.type}-' + ''.join(c if c.isalnum() else '-' for c in device.device_name.lower())
    return {'id': ident, 'device': device.device_name, 'cores': cores, 'cpu_model': _cpu_model(),
            'platform': platform.platform(terse=True)}


def _cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as info:
            return next(line.split(':', 1)[1].strip() for line in info if line.startswith('model name'))
    except (OSError, StopIteration):
        return platform.processor() or 'unknown'


def bench_op(op: str, args: argparse.Namespace, run_info: dict) -> dict:
    """Every case of ``op``; a bench module with variants of its own may run them (its ``bench_op``)."""
    bench = importlib.import_module(f'bench_{op}')
    if hasattr(bench, 'bench_op'):
        return bench.bench_op(args, run_info)
    found = harness.variants(op, args.variants)
    chosen = [v for v, why in found.items() if why is None]
    settings = harness.SETTINGS[args.size]
    cases = []
    for case in bench.cases(args.size):
        label = bench.label(case)
        measured = {'label': label, 'case': case, 'limit': bench.limit(case, settings), 'variants': {}}
        print(f'{op} {label} limit: {report.limit_text(measured["limit"])}', flush=True)
        for variant in chosen:
            result = harness.run_variant(op, case, variant, settings)
            measured['variants'][variant] = result
            print(f'{op} {label} {variant}: {report.one_line(result)}', flush=True)
        cases.append(measured)
    return {'run': run_info, 'skipped': {v: why for v, why in found.items() if why}, 'cases': cases}


def tuning_effect(op: str, measured: dict, settings: harness.Settings, date: str) -> Optional[dict]:
    """The first case's eager variant again, in a process started with TWINKLE_CPU_TUNING=0."""
    if not measured['cases'] or 'eager' not in measured['cases'][0]['variants']:
        return None
    first = measured['cases'][0]
    off = harness.run_variant(op, first['case'], 'eager', settings, tuning=False)
    print(f'{op} {first["label"]} eager, TWINKLE_CPU_TUNING=0: {report.one_line(off)}', flush=True)
    return {'op': op, 'label': first['label'], 'date': date, 'on': first['variants']['eager'], 'off': off}


def write_results(record: dict, path: Path) -> dict:
    """Merge into the machine's file: ops (and the tuning row) measured now replace earlier ones."""
    if path.exists():
        earlier = json.loads(path.read_text())
        merged = {**earlier.get('ops', {}), **record['ops']}
        record = {**earlier, **record, 'ops': {op: merged[op] for op in ALL_OPS if op in merged}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + '\n')
    return record


def write_report(out: Path) -> None:
    """The plots and RESULTS.md, from every results file under ``out``."""
    paths = sorted((out / 'results').glob('*.json'))
    for path in paths:
        report.plot(json.loads(path.read_text()), path.with_suffix('.png'))
    training = sorted((out / 'results' / 'training').glob('*.json'))
    (out / 'RESULTS.md').write_text(report.render(paths) + report.render_training(training))


def main(argv: Optional[List[str]] = None) -> Optional[Path]:
    args = parse_args(argv)
    if args.report_only:
        write_report(args.out)
        return None
    from twinkle import backends
    if args.device:
        os.environ['TWINKLE_DEVICE'] = args.device  # inherited by every measuring process
        backends.reset()
    device = backends.current()  # CPU tuning on before the first large allocation
    if device.type != 'cpu':
        torch.set_default_device(device.local_device())  # the limits' probes run where the variants do
    machine = machine_facts(device)
    date = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
    settings = harness.SETTINGS[args.size]
    run_info = {
        'date': date, 'size': args.size, 'device': device.type, 'torch': torch.__version__,
        'threads': torch.get_num_threads(),
        'tuning': device.tune_process(), 'load_average': round(os.getloadavg()[0], 2),
        'probes': {'copy_mib': settings.copy_mib, 'gemm_n': settings.gemm_n}, 'note': args.note,
    }
    record = {'machine': machine, 'ops': {}}
    for op in args.ops:
        try:
            record['ops'][op] = bench_op(op, args, run_info)
        except Exception as failure:  # noqa: BLE001  (one op must not lose the others' measurements)
            traceback.print_exc()
            record['ops'][op] = {'run': run_info, 'not_measured': f'{type(failure).__name__}: {failure}',
                                 'cases': []}
        if device.type == 'cpu' and 'tuning_effect' not in record:
            effect = tuning_effect(op, record['ops'][op], settings, date)
            if effect:
                record['tuning_effect'] = effect
    suffix = '-quick' if args.quick else ''
    path = args.out / 'results' / f'{machine["id"]}{suffix}.json'
    record = write_results(record, path)
    write_report(args.out)
    print(report.render_record(record))
    return path


if __name__ == '__main__':
    main()
