"""make gpu-check without a GPU: the refusal on this machine, and each piece of the GPU run (the test
command and its outcome plugin, phase timeouts, the summary files, the harness's --device) on CPU."""
import fcntl
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = ROOT / 'benchmarks'
no_gpu_here = pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has a CUDA GPU: the check would run')


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    import gpu_check
    return gpu_check


@no_gpu_here
def test_without_a_gpu_it_says_so_and_exits_2():
    done = subprocess.run([sys.executable, str(BENCH_DIR / 'gpu_check.py')], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ''
    (line,) = done.stderr.splitlines()
    assert line.startswith('make gpu-check needs a CUDA GPU: torch.cuda.is_available() is False')
    assert line.endswith('the CPU suite is `make test`')


@pytest.mark.skipif(shutil.which('make') is None, reason='no make on this machine')
def test_make_target_runs_the_script():
    env = {k: v for k, v in os.environ.items() if k not in ('MAKEFLAGS', 'MAKELEVEL', 'MFLAGS')}  # under `make test`
    done = subprocess.run(['make', '--no-print-directory', '-n', 'gpu-check'], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].endswith('.venv/bin/python benchmarks/gpu_check.py')


def test_tests_run_on_cuda_compiled_with_the_outcome_plugin(gpu_check, tmp_path):
    assert gpu_check.test_command('python') == ['python', '-m', 'pytest', '-q', '-p', 'gpu_check', 'tests/kernels']
    env = gpu_check.test_environment(tmp_path / 'outcomes.jsonl',
                                     base={'TRITON_INTERPRET': '1', 'PYTHONPATH': '/elsewhere', 'HOME': '/home'})
    assert env == {'TWINKLE_TEST_DEVICE': 'cuda', 'TWINKLE_GPU_CHECK_OUTCOMES': str(tmp_path / 'outcomes.jsonl'),
                   'PYTHONPATH': f'{BENCH_DIR}:/elsewhere', 'HOME': '/home'}


OUTCOME_CASES = '''
    import pytest

    def test_passes():
        pass

    def test_fails():
        assert 1 == 2, 'one is not two'

    @pytest.mark.skip(reason='not here')
    def test_skipped():
        pass

    def test_skips_inside():
        pytest.skip('decided at run time')

    @pytest.fixture
    def broken():
        raise RuntimeError('set-up broke')

    def test_setup_error(broken):
        pass

    @pytest.mark.xfail(reason='known')
    def test_expected_failure():
        assert False

    @pytest.mark.xfail(reason='known')
    def test_unexpected_pass():
        pass
'''


def test_outcome_plugin_counts_as_pytest_does(gpu_check, tmp_path):
    (tmp_path / 'test_cases.py').write_text(textwrap.dedent(OUTCOME_CASES))
    outcomes = tmp_path / 'outcomes.jsonl'
    done = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'gpu_check', '-p', 'no:cacheprovider',
                           'test_cases.py'], cwd=tmp_path, env=gpu_check.test_environment(outcomes),
                          capture_output=True, text=True, timeout=120)
    assert '1 failed, 1 passed, 2 skipped, 1 xfailed, 1 xpassed, 1 error' in done.stdout, done.stdout
    found = gpu_check.count_outcomes(outcomes)
    assert found['counts'] == {'passed': 1, 'failed': 1, 'error': 1, 'skipped': 2, 'xfailed': 1, 'xpassed': 1}
    failures = {f['test']: f for f in found['failures']}
    assert failures.keys() == {'test_cases.py::test_fails', 'test_cases.py::test_setup_error'}
    assert 'one is not two' in failures['test_cases.py::test_fails']['message']
    assert failures['test_cases.py::test_setup_error']['outcome'] == 'error'
    assert 'set-up broke' in failures['test_cases.py::test_setup_error']['message']


def test_outcomes_of_a_run_that_wrote_none(gpu_check, tmp_path):
    assert gpu_check.count_outcomes(tmp_path / 'absent.jsonl') == {
        'counts': dict.fromkeys(gpu_check.OUTCOMES, 0), 'failures': []}


def test_a_phase_past_its_timeout_is_stopped_with_its_children(gpu_check, tmp_path):
    """The phase's grandchild holds a file lock while it lives: the lock is free once the group is stopped."""
    lock = tmp_path / 'held'
    holder = f'import fcntl, time; f = open({str(lock)!r}, "w"); fcntl.flock(f, fcntl.LOCK_EX); f.write("locked"); ' \
             f'f.flush(); time.sleep(120)'
    parent = f'import subprocess, sys; subprocess.run([sys.executable, "-c", {holder!r}])'
    phase = gpu_check.run_phase([sys.executable, '-c', parent], timeout_s=5)
    assert phase['timed_out'] and phase['returncode'] != 0 and phase['timeout_s'] == 5
    assert 5 <= phase['seconds'] < 5 + 2 * gpu_check.KILL_GRACE_S
    assert lock.read_text() == 'locked', 'the grandchild had not started within the timeout'
    with open(lock) as held:
        for _ in range(50):  # the kernel frees the lock when the process is gone
            try:
                fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.1)
        else:
            pytest.fail('the grandchild outlived its phase')

    finished = gpu_check.run_phase([sys.executable, '-c', 'raise SystemExit(3)'], timeout_s=60)
    assert finished['returncode'] == 3 and not finished['timed_out']


def test_benchmark_phases_fit_the_budget(gpu_check):
    assert gpu_check.bench_command('rope', 'python')[1:] == [
        str(BENCH_DIR / 'run.py'), '--quick', '--device', 'cuda', '--ops', 'rope',
        '--note', 'Measured by make gpu-check (quick shapes).']
    assert gpu_check.op_timeout('rope', 1000) == gpu_check.DEFAULT_OP_TIMEOUT_S
    assert gpu_check.op_timeout('moe', 1000) == 90
    assert gpu_check.op_timeout('rope', 40) == 40 - gpu_check.KILL_GRACE_S  # ends, killed or not, within the budget
    assert gpu_check.op_timeout('rope', gpu_check.MIN_OP_S + gpu_check.KILL_GRACE_S - 1) is None
    import run
    worst = gpu_check.TESTS_TIMEOUT_S + gpu_check.KILL_GRACE_S * 2 + sum(
        gpu_check.OP_TIMEOUT_S.get(op, gpu_check.DEFAULT_OP_TIMEOUT_S) for op in run.OPS)
    assert gpu_check.BUDGET_S <= min(worst, 8 * 60 - 30)  # the budget, not the sum of timeouts, bounds the run


def fake_record(ops):
    result = {'fwd_ms': 0.25, 'bwd_ms': 0.75, 'fwd_bwd_ms': 1.0, 'reps': 5, 'peak_mib': 10.0,
              'peak_above_setup_mib': 4.0, 'threads': 16, 'tuning': {}}
    run_info = {'date': '2026-12-03 10:00 UTC', 'size': 'quick', 'device': 'cuda', 'torch': '2.13.0+cu128',
                'threads': 16, 'tuning': {}, 'load_average': 0.1, 'probes': {'copy_mib': 256, 'gemm_n': 1024},
                'note': 'Measured by make gpu-check (quick shapes).'}
    case = {'label': '1024x1024 float32', 'case': {},
            'variants': {'eager': result, 'liger': dict(result, fwd_bwd_ms=0.5)},
            'limit': {'kind': 'bandwidth', 'bytes_moved': 2 ** 30, 'copy_gb_s': 4000.0, 'limit_ms': 0.27,
                      'output_mib': 8.0, 'fault_ms': 0.01}}
    return {'machine': {'id': 'cuda-nvidia-h200', 'device': 'NVIDIA H200', 'cores': 16, 'cpu_model': 'Xeon',
                        'platform': 'Linux'},
            'ops': {op: {'run': run_info, 'skipped': {'cpu': 'runs on cpu, not cuda'}, 'cases': [case]} for op in ops}}


def test_measured_now_keeps_only_this_checks_ops(gpu_check, tmp_path):
    path = tmp_path / 'cuda-nvidia-h200-quick.json'
    path.write_text(json.dumps(fake_record(['rms_norm', 'swiglu'])))
    assert list(gpu_check.measured_now(path, ['swiglu'])['ops']) == ['swiglu']
    assert gpu_check.measured_now(tmp_path / 'absent.json', ['swiglu']) is None


def test_summary_json_and_markdown_name_the_gpu(gpu_check, tmp_path):
    phase = {'command': 'python -m pytest -q -p gpu_check tests/kernels', 'returncode': 1, 'timed_out': False,
             'timeout_s': 200, 'seconds': 123.4}
    counts = {'passed': 380, 'failed': 1, 'error': 0, 'skipped': 30, 'xfailed': 0, 'xpassed': 0}
    summary = {
        'machine': fake_record([])['machine'], 'date': '2026-12-03 10:00 UTC', 'torch': '2.13.0+cu128',
        'triton': '3.5.0', 'compute_capability': '9.0', 'seconds': 400.0,
        'tests': {'phase': phase, 'counts': counts,
                  'failures': [{'test': 'tests/kernels/test_rope.py::test_x', 'outcome': 'failed',
                                'message': 'AssertionError: Tensor-likes are not close!'}]},
        'benchmarks': {'phases': {
            'rms_norm': {'command': 'run.py', 'returncode': 0, 'timed_out': False, 'timeout_s': 60, 'seconds': 31.0},
            'fused_linear_cross_entropy': {'command': 'run.py', 'returncode': -15, 'timed_out': True,
                                           'timeout_s': 60, 'seconds': 60.2},
            'moe': {'not_started': 'the 450 s budget was spent'}},
            'record': fake_record(['rms_norm'])},
    }
    path = gpu_check.write_summary(summary, tmp_path)
    assert path == tmp_path / 'results' / 'gpu-check' / 'cuda-nvidia-h200.json'
    assert json.loads(path.read_text()) == summary
    markdown = path.with_suffix('.md').read_text()
    assert markdown.startswith('# make gpu-check on NVIDIA H200\n')
    assert '`TWINKLE_TEST_DEVICE=cuda python -m pytest -q -p gpu_check tests/kernels`: exit 1 after 123 s.' in markdown
    assert '| passed | failed | error | skipped | xfailed | xpassed |\n|---|---|---|---|---|---|\n' \
           '| 380 | 1 | 0 | 30 | 0 | 0 |' in markdown
    assert '- failed: `tests/kernels/test_rope.py::test_x`: AssertionError: Tensor-likes are not close!' in markdown
    assert '| rms_norm | exit 0 | 31 |' in markdown
    assert '| fused_linear_cross_entropy | stopped by its 60 s timeout | 60 |' in markdown
    assert '| moe | not started: the 450 s budget was spent | |' in markdown
    assert '### rms_norm' in markdown and '| twinkle liger | 0.25 | 0.75 | 0.50 | 0.50 |' in markdown
    assert list((tmp_path / 'results').glob('*.json')) == []  # RESULTS.md renders results/*.json only


def test_runner_device_option_on_cpu(monkeypatch, tmp_path):
    """--device sets TWINKLE_DEVICE for the measuring processes; a device the host lacks is one clear error."""
    from twinkle import backends
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    monkeypatch.setenv('TWINKLE_DEVICE', 'cpu')  # run.main sets it: monkeypatch restores the original
    import run
    assert run.parse_args(['--device', 'cuda']).device == 'cuda'
    with pytest.raises(SystemExit):
        run.parse_args(['--device', 'tpu'])
    try:
        with pytest.raises(RuntimeError, match=r"TWINKLE_DEVICE='cuda' but this host has no usable cuda device"):
            run.main(['--quick', '--device', 'cuda', '--ops', 'rms_norm', '--out', str(tmp_path)])
    finally:
        backends.reset()


def test_workloads_move_to_the_device_and_keep_their_leaves(monkeypatch):
    """'meta' stands in for a GPU: bench modules build workloads on the CPU, the harness moves them."""
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    import harness
    module = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3, requires_grad=True)
    labels = torch.tensor([0, 1, 1, 0])
    work = harness.Workload(args=(module, x, labels, None, 'mean'), leaves=(x, *module.parameters()),
                            grad_outputs=(torch.ones(4, 2),))
    assert harness.on_device(work, torch.device('cpu')).args[1] is x  # nothing moves on the CPU

    moved = harness.on_device(work, torch.device('meta'))
    module_there, x_there, labels_there, none, reduction = moved.args
    assert module_there is module and module.weight.device.type == 'meta'
    assert x_there.device.type == labels_there.device.type == moved.grad_outputs[0].device.type == 'meta'
    assert x_there.is_leaf and x_there.requires_grad and not labels_there.requires_grad
    assert (none, reduction) == (None, 'mean')
    assert moved.leaves[0] is x_there
    assert [id(p) for p in moved.leaves[1:]] == [id(p) for p in module.parameters()]


def test_timings_wait_for_the_device(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    import harness
    from twinkle import backends
    calls = []
    monkeypatch.setattr(backends.current(), 'synchronize', lambda: calls.append('sync'))
    harness.median_ms(lambda: calls.append('run'), reps=2, warmup=1)
    assert calls == ['run'] + ['sync', 'run', 'sync'] * 2


def test_the_whole_check_with_its_phases_faked(gpu_check, monkeypatch, tmp_path, capsys):
    """main() on a pretend H200: the tests phase takes 250 s, each op 40 s on a fake clock; moe gets
    what is left of the budget and overruns it. The summary says so and the exit status is 1."""
    from twinkle.backends import CudaBackend
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(CudaBackend, 'device_name', property(lambda self: 'NVIDIA H200'))
    monkeypatch.setattr(CudaBackend, 'compute_capability', property(lambda self: (9, 0)))
    clock = [1000.0]
    monkeypatch.setattr(gpu_check.time, 'monotonic', lambda: clock[0])
    results = tmp_path / 'results' / 'cuda-nvidia-h200-quick.json'
    results.parent.mkdir(parents=True)
    results.write_text(json.dumps(fake_record(['rope'])))  # an earlier run's op: not this check's

    def fake_phase(command, timeout_s, env=None):
        if command[-1] == 'tests/kernels':
            assert env['TWINKLE_TEST_DEVICE'] == 'cuda' and 'TRITON_INTERPRET' not in env
            with open(env[gpu_check.OUTCOMES_ENV], 'a') as out:
                out.write(json.dumps({'test': 't::a', 'outcome': 'passed'}) + '\n')
                out.write(json.dumps({'test': 't::b', 'outcome': 'skipped'}) + '\n')
            seconds, returncode = 250.0, 0
        else:
            op = command[command.index('--ops') + 1]
            assert command[command.index('--out') + 1] == str(tmp_path)
            seconds = min(40.0, timeout_s)
            returncode = 0 if seconds < timeout_s else -15
            if returncode == 0:
                record = json.loads(results.read_text())
                record['ops'][op] = fake_record([op])['ops'][op]
                results.write_text(json.dumps(record))
        clock[0] += seconds
        return {'command': ' '.join(command), 'returncode': returncode, 'timed_out': returncode != 0,
                'timeout_s': round(timeout_s), 'seconds': seconds}

    monkeypatch.setattr(gpu_check, 'run_phase', fake_phase)
    assert gpu_check.main(['--out', str(tmp_path)]) == 1
    summary = json.loads((tmp_path / 'results' / 'gpu-check' / 'cuda-nvidia-h200.json').read_text())
    assert summary['machine']['device'] == 'NVIDIA H200' and summary['compute_capability'] == '9.0'
    assert summary['tests']['counts'] == {'passed': 1, 'failed': 0, 'error': 0, 'skipped': 1, 'xfailed': 0,
                                          'xpassed': 0}
    phases = summary['benchmarks']['phases']
    assert [phases[op]['timeout_s'] for op in phases] == [60, 60, 60, 60, 30]  # 450 - 250 - 4 * 40 - kill grace
    assert phases['moe']['timed_out'] and summary['seconds'] == 440  # the kill grace left for a stuck op
    assert list(summary['benchmarks']['record']['ops']) == ['rms_norm', 'swiglu', 'rope',
                                                           'fused_linear_cross_entropy']
    assert not list((tmp_path / 'results' / 'gpu-check').glob('*.jsonl'))  # the outcomes file is not left behind
    assert 'gpu-check: 1 passed, 0 failed, 0 errors, 1 skipped; benchmarks of 4/5 ops' in capsys.readouterr().out
