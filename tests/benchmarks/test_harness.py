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
    rows = report.Table(report.DEFAULT_BASELINES, compute=True).case_rows(case)
    assert any('failed: RuntimeError: kernel crashed' in row for row in rows)


def test_an_op_with_its_own_baselines_is_rendered_against_them(bench):
    """bench_moe's variants: ratios to HF grouped_mm and HF eager, GFLOP/s and the share of the GEMM
    rate, display names, and why a variant was skipped."""
    _, report, _ = bench

    def result(ms, mib):
        return {'fwd_ms': ms / 4, 'bwd_ms': 3 * ms / 4, 'fwd_bwd_ms': ms, 'reps': 5, 'peak_mib': 2 * mib,
                'peak_above_setup_mib': mib}

    case = {'label': 'T=4 fp32', 'limit': {'kind': 'compute', 'flops': 4e9, 'gemm_gflop_s': 4.0, 'limit_ms': 1000.0,
                                           'expert_gemms_ms': 900.0, 'output_mib': 1.0, 'fault_ms': 1.0},
            'variants': {'hf_grouped_mm': result(2000.0, 100.0), 'hf_eager': result(8000.0, 400.0),
                         'twinkle': result(1600.0, 80.0)}}
    measured = {'run': {}, 'skipped': {'hf_batched_mm': 'out of memory'}, 'cases': [case],
                'baselines': ['hf_grouped_mm', 'hf_eager']}
    lines = report._op_section('moe', measured, cores=2, show_run=False)
    header = next(line for line in lines if line.startswith('| case'))
    assert '÷ HF grouped_mm | ÷ HF eager | ÷ limit | GFLOP/s | % GEMM rate' in header
    assert header.endswith('above set-up ÷ HF grouped_mm |')
    assert 'Skipped: HF experts, batched_mm (out of memory).' in lines
    gemms_alone = next(line for line in lines if "the experts' GEMMs alone" in line)
    assert gemms_alone.split(' | ')[4] == '900.00'  # in the fwd+bwd column
    twinkle = next(line for line in lines if '| twinkle MoE ops |' in line)
    # 1600 ms: 0.80 of HF grouped_mm, 0.20 of HF eager, 1.60 of the limit, 2.5 GFLOP/s = 62 % of 4; memory 0.80
    assert twinkle == '|  | twinkle MoE ops | 400.00 | 1200.00 | 1600.00 | 0.80 | 0.20 | 1.60 | 2 | 62 | 160 | 80 | 0.80 |'


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


def test_moe_limit_keeps_the_faster_of_the_probes_before_and_after(bench):
    import bench_moe
    before = {'gemm_gflop_s': 90.0, 'limit_ms': 20.0, 'expert_gemms_ms': 30.0, 'fault_ms': 1.0}
    after = {'gemm_gflop_s': 150.0, 'limit_ms': 12.0, 'expert_gemms_ms': 35.0, 'fault_ms': 2.0}
    assert bench_moe._steadier_limit(before, after) == dict(after, expert_gemms_ms=30.0)
    assert bench_moe._steadier_limit(after, before) == dict(after, expert_gemms_ms=30.0)


def test_whole_job_results_are_written_and_rendered(bench, tmp_path):
    harness, _, run = bench
    ranks = [{'local_ms': 10.0, 'ep_ms': 12.0, 'sent_bytes': 2.0 * 2**20, 'minimum_bytes': 2.0 * 2**20}] * 2
    result = {'date': 'today', 'torch': '2.13.0', 'load_average': 1.0, 'ranks': ranks, 'dispatch_bytes_ratio': [1.0, 1.0],
              'shape': dict(tokens=8, hidden=4, intermediate=2, experts=4, top_k=2)}
    harness.whole_job_main('expert_parallel', 'test', lambda quick: dict(result, quick=quick),
                           ['--quick', '--out', str(tmp_path)])
    saved = json.loads((tmp_path / 'results' / 'training' / 'expert_parallel-quick.json').read_text())
    assert saved['quick'] is True
    text = (tmp_path / 'RESULTS.md').read_text()
    assert 'Expert parallelism, 2 processes on gloo (expert_parallel-quick)' in text
    assert '| 1 | 10 | 12 | 2.0 | 2.0 | 1.000 |' in text
    (tmp_path / 'results' / 'training' / 'unknown.json').write_text('{}')
    with pytest.raises(ValueError, match="no renderer for whole-job results named 'unknown'"):
        run.write_report(tmp_path)
