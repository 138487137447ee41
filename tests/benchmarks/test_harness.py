"""The benchmark harness end to end on a tiny RMSNorm (eager only: torch.compile would take a
minute), plus the pieces that need no subprocess. Timings are never asserted, only their shape."""
import json
import math
import os
import subprocess
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / 'benchmarks'
TINY = {'rows': 64, 'hidden': 96, 'dtype': 'float32'}


@pytest.fixture
def bench(monkeypatch):
    """The benchmarks/ modules, importable as the runner imports them."""
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    import bench_rms_norm
    import harness
    import report
    import run
    monkeypatch.setattr(bench_rms_norm, 'cases', lambda size: [dict(TINY)])
    monkeypatch.setitem(harness.SETTINGS, 'quick', harness.Settings(
        warmup=1, min_reps=3, max_reps=3, budget_s=0.1, copy_mib=8, gemm_n=128))
    return harness, report, run


def _positive(value) -> bool:
    return isinstance(value, float) and value > 0 and math.isfinite(value)


def test_runner_writes_json_markdown_and_plot(bench, tmp_path):
    harness, report, run = bench
    path = run.main(['--quick', '--ops', 'rms_norm', '--variants', 'eager', '--out', str(tmp_path)])

    record = json.loads(path.read_text())
    assert path.name == f'{record["machine"]["id"]}-quick.json'
    measured = record['ops']['rms_norm']
    assert measured['run']['size'] == 'quick'
    assert measured['skipped']['compile'] == 'not asked for (--variants)'
    (case,) = measured['cases']
    assert case['case'] == TINY
    assert case['limit']['bytes_moved'] == 5 * 64 * 96 * 4 + 3 * 96 * 4 + 8 * 64
    assert all(_positive(case['limit'][key]) for key in ('copy_gb_s', 'limit_ms', 'fault_ms'))
    assert math.isclose(case['limit']['limit_ms'], case['limit']['bytes_moved'] / case['limit']['copy_gb_s'] / 1e6)
    eager = case['variants']['eager']
    assert list(case['variants']) == ['eager']
    for key in ('fwd_ms', 'bwd_ms', 'fwd_bwd_ms', 'peak_mib'):
        assert _positive(eager[key]), key
    assert eager['reps'] == 3 and eager['peak_above_setup_mib'] >= 0
    assert eager['tuning'].get('THP_MEM_ALLOC_ENABLE') == '1'

    effect = record['tuning_effect']
    assert effect['on'] == eager and effect['off']['tuning'] == {}
    assert _positive(effect['off']['fwd_bwd_ms'])

    markdown = (tmp_path / 'RESULTS.md').read_text()
    assert '| 64x96 float32 | physical limit:' in markdown and '| eager (reference) |' in markdown
    assert path.with_suffix('.png').read_bytes()[:4] == b'\x89PNG'
    assert f'](results/{path.stem}.png)' in markdown

    (tmp_path / 'RESULTS.md').unlink()
    assert run.main(['--report-only', '--out', str(tmp_path)]) is None
    assert (tmp_path / 'RESULTS.md').read_text() == markdown


def test_triton_is_skipped_although_the_tests_run_its_interpreter(bench):
    harness, _, _ = bench
    assert os.environ['TRITON_INTERPRET'] == '1'
    assert 'CUDA' in harness.variants('rms_norm', {'triton'})['triton']


def test_a_failing_variant_is_recorded_not_raised(bench, monkeypatch):
    harness, report, _ = bench
    crashed = subprocess.CompletedProcess([], returncode=1, stdout='',
                                          stderr='Traceback ...\nRuntimeError: kernel crashed\n')
    monkeypatch.setattr(harness.subprocess, 'run', lambda *args, **kwargs: crashed)
    result = harness.run_variant('rms_norm', TINY, 'eager', harness.SETTINGS['quick'])
    assert result == {'error': 'RuntimeError: kernel crashed'}
    assert report.one_line(result) == 'FAILED: RuntimeError: kernel crashed'
    case = {'label': 'tiny', 'limit': {'kind': 'compute', 'flops': 1e9, 'gemm_gflop_s': 1.0, 'limit_ms': 1.0,
                                       'output_mib': 1.0, 'fault_ms': 1.0}, 'variants': {'eager': result}}
    assert any('failed: RuntimeError: kernel crashed' in row for row in report._case_rows(case))


def test_results_of_earlier_runs_are_kept_until_remeasured(bench, tmp_path):
    _, _, run = bench
    path = tmp_path / 'machine.json'
    run.write_results({'machine': {'id': 'm'}, 'ops': {'rope': 1, 'swiglu': 1}, 'tuning_effect': 'earlier'}, path)
    merged = run.write_results({'machine': {'id': 'm'}, 'ops': {'rope': 2, 'rms_norm': 2}}, path)
    assert merged['ops'] == {'rms_norm': 2, 'swiglu': 1, 'rope': 2}
    assert list(merged['ops']) == ['rms_norm', 'swiglu', 'rope']  # the runner's order, whatever ran when
    assert merged['tuning_effect'] == 'earlier'
    assert json.loads(path.read_text()) == merged


def test_bad_arguments_are_refused(bench):
    _, _, run = bench
    with pytest.raises(SystemExit):
        run.parse_args(['--ops', 'no_such_op'])
    with pytest.raises(SystemExit):
        run.parse_args(['--quick', '--full'])
