"""``make gpu-check``: on a CUDA machine, in under 8 minutes, the kernel tests with Triton compiled,
then the kernel benchmarks on the GPU, then one JSON and one markdown table named after the GPU.

1. tests: ``pytest tests/kernels`` with ``TWINKLE_TEST_DEVICE=cuda`` (tests/conftest.py then leaves
   TRITON_INTERPRET unset and the tests put their tensors on the GPU, in fp32, bf16 and fp16);
   this module is loaded into pytest as a plugin (``-p gpu_check``) that writes each outcome as it
   happens, so a run cut off by its timeout still counts the tests that finished.
2. benchmarks: ``run.py --quick --device cuda`` once per op (eager, torch.compile, Triton, Liger...),
   each with its own timeout, so that one slow op loses only its own numbers; run.py also writes
   ``results/cuda-<gpu>-quick.json`` and RESULTS.md as ``make bench`` does.
3. ``results/gpu-check/cuda-<gpu>.json`` and ``.md``: the test counts and failures, each phase's
   exit status and time, and the benchmark tables.

On a machine without a CUDA GPU it says so on stderr and exits 2.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
NO_GPU_EXIT = 2
BUDGET_S = 450            # the whole check, kills included; the rest of the 8 minutes: start-up and writing
TESTS_TIMEOUT_S = 240     # the first tests also build the C++ CPU kernels (CPU-tensor tests select them)
OP_TIMEOUT_S = {'moe': 90}  # each op's benchmarks: a fresh process per variant (moe: two rounds of four)
DEFAULT_OP_TIMEOUT_S = 60
MIN_OP_S = 20             # an op with less time left is not started
KILL_GRACE_S = 10
OUTCOMES_ENV = 'TWINKLE_GPU_CHECK_OUTCOMES'  # where the pytest plugin below appends one JSON line per outcome
OUTCOMES = ('passed', 'failed', 'error', 'skipped', 'xfailed', 'xpassed')


def no_gpu_message(torch_version: str) -> str:
    return (f'make gpu-check needs a CUDA GPU: torch.cuda.is_available() is False (no NVIDIA GPU or driver, '
            f'or a CPU-only torch build: torch {torch_version}); the CPU suite is `make test`')


# -- phase 1: the kernel tests -----------------------------------------------------------------

def test_command(python: str = sys.executable) -> List[str]:
    return [python, '-m', 'pytest', '-q', '-p', 'gpu_check', 'tests/kernels']


def test_environment(outcomes: Path, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The tests on the GPU, Triton compiled, with this module importable as their plugin."""
    env = dict(os.environ if base is None else base)
    env.pop('TRITON_INTERPRET', None)
    env['TWINKLE_TEST_DEVICE'] = 'cuda'
    env[OUTCOMES_ENV] = str(outcomes)
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(BENCH_DIR), env.get('PYTHONPATH')]))
    return env


def pytest_runtest_logreport(report) -> None:
    """(pytest hook, with ``-p gpu_check``) one line per outcome, as pytest counts them: a failing
    set-up or teardown is an error, a skip in set-up a skip."""
    path = os.environ.get(OUTCOMES_ENV)
    if not path or (report.when != 'call' and report.outcome == 'passed'):
        return
    if hasattr(report, 'wasxfail'):
        outcome = 'xfailed' if report.skipped else 'xpassed'
    elif report.failed and report.when != 'call':
        outcome = 'error'
    else:
        outcome = report.outcome
    line = {'test': report.nodeid, 'outcome': outcome}
    if outcome in ('failed', 'error'):
        line['message'] = _failure_message(report)
    with open(path, 'a') as out:
        out.write(json.dumps(line) + '\n')


def _failure_message(report) -> str:
    """The exception's first line ('AssertionError: ...'), else the report's last line."""
    crash = getattr(report.longrepr, 'reprcrash', None)
    text = getattr(crash, 'message', None) or report.longreprtext
    lines = text.strip().splitlines()
    return (lines[0] if crash else lines[-1])[:300] if lines else ''


def count_outcomes(path: Path) -> dict:
    """The plugin's lines: a count per outcome, and the failures with their exception's first line."""
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    counts = collections.Counter(line['outcome'] for line in lines)
    return {'counts': {outcome: counts.get(outcome, 0) for outcome in OUTCOMES},
            'failures': [{k: line[k] for k in ('test', 'outcome', 'message')} for line in lines
                         if line['outcome'] in ('failed', 'error')]}


# -- running a phase under its timeout ---------------------------------------------------------

def run_phase(command: List[str], timeout_s: float, env: Optional[Dict[str, str]] = None) -> dict:
    """``command`` in its own process group, stopped with it (SIGTERM, then SIGKILL) at the timeout;
    its output goes to ours as it comes."""
    start = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)
    try:
        returncode = process.wait(timeout=timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
        _stop(process)
        returncode = process.returncode
    return {'command': ' '.join(command), 'returncode': returncode, 'timed_out': timed_out,
            'timeout_s': round(timeout_s), 'seconds': round(time.monotonic() - start, 1)}


def _stop(process: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=KILL_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


# -- phase 2: the benchmarks -------------------------------------------------------------------

def bench_command(op: str, python: str = sys.executable) -> List[str]:
    return [python, str(BENCH_DIR / 'run.py'), '--quick', '--device', 'cuda', '--ops', op,
            '--note', 'Measured by make gpu-check (quick shapes).']


def op_timeout(op: str, seconds_left: float) -> Optional[float]:
    """``op``'s timeout, or None when too little of the budget is left to start it."""
    timeout = min(OP_TIMEOUT_S.get(op, DEFAULT_OP_TIMEOUT_S), seconds_left - KILL_GRACE_S)
    return timeout if timeout >= MIN_OP_S else None


# -- phase 3: the summary ----------------------------------------------------------------------

def write_summary(summary: dict, out: Path) -> Path:
    """``out/results/gpu-check/<machine id>.json`` and its ``.md``; the subfolder keeps it out of
    RESULTS.md, which run.py renders from ``results/*.json``."""
    import report
    folder = out / 'results' / 'gpu-check'
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f'{summary["machine"]["id"]}.json'
    path.write_text(json.dumps(summary, indent=1) + '\n')
    path.with_suffix('.md').write_text(render_summary(summary, report.render_record))
    return path


def render_summary(summary: dict, render_record) -> str:
    machine, tests = summary['machine'], summary['tests']
    phase = tests['phase']
    ended = f'stopped by its {phase["timeout_s"]} s timeout' if phase['timed_out'] else f'exit {phase["returncode"]}'
    lines = [f'# make gpu-check on {machine["device"]}', '',
             f'{summary["date"]}; torch {summary["torch"]}, triton {summary["triton"]}, '
             f'compute capability {summary["compute_capability"]}; {summary["seconds"]:.0f} s in all.', '',
             '## Kernel tests: Triton compiled, fp32 / bf16 / fp16', '',
             f'`TWINKLE_TEST_DEVICE=cuda {phase["command"]}`: {ended} after {phase["seconds"]:.0f} s.', '',
             '| ' + ' | '.join(OUTCOMES) + ' |', '|' + '---|' * len(OUTCOMES),
             '| ' + ' | '.join(str(tests['counts'][outcome]) for outcome in OUTCOMES) + ' |', '']
    if tests['failures']:
        lines += ['Failures:', ''] + [f'- {f["outcome"]}: `{f["test"]}`: {f["message"]}' for f in tests['failures']]
        lines.append('')
    lines += ['## Kernel benchmarks, quick shapes', '', '| op | phase | seconds |', '|---|---|---|']
    for op, step in summary['benchmarks']['phases'].items():
        if step.get('not_started'):
            lines.append(f'| {op} | not started: {step["not_started"]} | |')
            continue
        state = f'stopped by its {step["timeout_s"]} s timeout' if step['timed_out'] else f'exit {step["returncode"]}'
        lines.append(f'| {op} | {state} | {step["seconds"]:.0f} |')
    lines.append('')
    record = summary['benchmarks']['record']
    if record and record['ops']:
        lines.append(render_record(record))
    return '\n'.join(lines) + '\n'


def measured_now(results: Path, finished: List[str]) -> Optional[dict]:
    """run.py's record with only the ops that finished in this check (the file keeps older ones)."""
    if not results.exists():
        return None
    record = json.loads(results.read_text())
    return {**record, 'ops': {op: record['ops'][op] for op in finished if op in record['ops']}}


def run_tests(out: Path, machine_id: str) -> dict:
    """Phase 1: the kernel tests on the GPU; their outcomes as the plugin wrote them."""
    outcomes = out / 'results' / 'gpu-check' / f'{machine_id}-outcomes.jsonl'
    outcomes.parent.mkdir(parents=True, exist_ok=True)
    outcomes.unlink(missing_ok=True)
    phase = run_phase(test_command(), TESTS_TIMEOUT_S, test_environment(outcomes))
    found = count_outcomes(outcomes)
    outcomes.unlink(missing_ok=True)
    return {'phase': phase, **found}


def run_benchmarks(out: Path, machine_id: str, deadline: float) -> dict:
    """Phase 2: one run.py per op while the budget lasts; the record of the ops that finished."""
    import run
    phases, finished = {}, []
    for op in run.OPS:
        timeout = op_timeout(op, deadline - time.monotonic())
        if timeout is None:
            phases[op] = {'not_started': f'the {BUDGET_S} s budget was spent'}
            continue
        phases[op] = run_phase(bench_command(op) + ['--out', str(out)], timeout)
        if phases[op]['returncode'] == 0:
            finished.append(op)
    return {'phases': phases, 'record': measured_now(out / 'results' / f'{machine_id}-quick.json', finished)}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', type=Path, default=BENCH_DIR, help='where results/ goes')
    args = parser.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print(no_gpu_message(torch.__version__), file=sys.stderr)
        return NO_GPU_EXIT
    started = time.monotonic()
    import run
    from twinkle.backends import CudaBackend
    device = CudaBackend()
    machine = run.machine_facts(device)
    summary = {'machine': machine,
               'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
               'torch': torch.__version__, 'triton': _version('triton'),
               'compute_capability': '.'.join(map(str, device.compute_capability))}
    summary['tests'] = run_tests(args.out, machine['id'])
    summary['benchmarks'] = run_benchmarks(args.out, machine['id'], deadline=started + BUDGET_S)
    summary['seconds'] = round(time.monotonic() - started, 1)
    path = write_summary(summary, args.out)
    counts, measured = summary['tests']['counts'], summary['benchmarks']['record']
    finished = len(measured['ops']) if measured else 0
    print(f'gpu-check: {counts["passed"]} passed, {counts["failed"]} failed, {counts["error"]} errors, '
          f'{counts["skipped"]} skipped; benchmarks of {finished}/{len(run.OPS)} ops; '
          f'{path} and {path.with_suffix(".md")}')
    phase = summary['tests']['phase']
    tests_failed = counts['failed'] or counts['error'] or phase['timed_out'] or phase['returncode'] != 0
    return 1 if tests_failed or finished < len(run.OPS) else 0


def _version(package: str) -> str:
    from importlib import metadata
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return 'not installed'


if __name__ == '__main__':
    sys.exit(main())
