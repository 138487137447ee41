"""CPU backend: peak memory from the process high-water mark, and process tuning.

Each case runs in a fresh interpreter: the tuning must happen before torch's first large
allocation, and VmHWM is per process."""
import json
import os
import subprocess
import sys
import textwrap

import pytest


def run_python(code: str, **env) -> dict:
    full_env = {k: v for k, v in os.environ.items()
                if k not in ('THP_MEM_ALLOC_ENABLE', 'OMP_NUM_THREADS', 'TWINKLE_CPU_TUNING')}
    full_env.update(env)
    result = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], capture_output=True, text=True,
                            env=full_env, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


PEAK_PROBE = '''
    import json, torch
    from twinkle import backends
    cpu = backends.current()
    big = torch.ones(256 * 2**20 // 4)       # 256 MiB, touched
    del big
    before = cpu.peak_memory()
    cpu.reset_peak_memory()
    after_reset = cpu.peak_memory()
    small = torch.ones(64 * 2**20 // 4)      # 64 MiB
    print(json.dumps({'before': before, 'after_reset': after_reset, 'after_small': cpu.peak_memory()}))
'''


def test_peak_memory_sees_torch_allocations_and_resets():
    mib = 2**20
    figures = run_python(PEAK_PROBE)
    assert figures['before'] - figures['after_reset'] > 200 * mib   # the freed 256 MiB left the mark
    assert figures['after_small'] - figures['after_reset'] > 50 * mib


TUNING_PROBE = '''
    import json, os, torch
    from twinkle import backends
    from twinkle.backends.cpu import applied_tuning
    backends.current()
    print(json.dumps({'applied': applied_tuning(), 'thp': os.environ.get('THP_MEM_ALLOC_ENABLE'),
                      'threads': torch.get_num_threads()}))
'''


def test_tuning_applied_when_cpu_is_selected():
    figures = run_python(TUNING_PROBE)
    assert figures['thp'] == '1'
    assert figures['applied']['THP_MEM_ALLOC_ENABLE'] == '1'
    assert figures['applied']['intra_op_threads'] == figures['threads'] >= 1


def test_tuning_respects_user_settings():
    figures = run_python(TUNING_PROBE, THP_MEM_ALLOC_ENABLE='0', OMP_NUM_THREADS='1')
    assert figures['thp'] == '0'
    assert figures['threads'] == 1
    assert figures['applied'] == {}


def test_tuning_can_be_turned_off():
    figures = run_python(TUNING_PROBE, TWINKLE_CPU_TUNING='0')
    assert figures['applied'] == {}
    assert figures['thp'] is None


def test_threads_shared_among_local_ranks():
    figures = run_python(TUNING_PROBE, LOCAL_WORLD_SIZE='2')
    cores = len(os.sched_getaffinity(0))
    assert figures['threads'] == max(1, cores // 2)


@pytest.mark.parametrize('tuning', ['1'])
def test_initialize_applies_tuning(tuning):
    figures = run_python('''
        import json, os, twinkle
        twinkle.initialize(seed=1)
        print(json.dumps({'thp': os.environ.get('THP_MEM_ALLOC_ENABLE')}))
    ''', TWINKLE_CPU_TUNING=tuning)
    assert figures['thp'] == '1'
