"""Faults under torchrun (2 CPU processes, gloo): SIGKILL during a save never loses the previous
checkpoint, a dead peer is named within seconds under the default timeout, uneven data stops the
job with a message instead of a collective mismatch. The jobs are in fault_jobs.py."""
import hashlib
import json
import os
import pathlib
import subprocess
import sys

import pytest

from twinkle.runtime import DEFAULT_CPU_TIMEOUT

ROOT = pathlib.Path(__file__).resolve().parents[2]
JOBS = ROOT / 'tests' / 'model' / 'fault_jobs.py'
ENV = dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', OMP_NUM_THREADS='1', TWINKLE_DEVICE='cpu',
           TWINKLE_LOG_LEVEL='WARNING')
LAUNCH_TIMEOUT = 300  # seconds for one torchrun job; a healthy one takes 10-30 s here


def torchrun(job: str, out: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    # A long monitor interval: when one rank dies, torchrun waits that long before it stops the
    # others, so a surviving rank always gets to report what it saw first.
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
               '--monitor-interval=20', str(JOBS), job, str(out), *args]
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)


def result(out: pathlib.Path, job: str, rank: int) -> dict:
    return json.loads((out / f'{job}.rank{rank}.json').read_text())


def digests(directory: pathlib.Path) -> dict:
    return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.rglob('*')) if path.is_file()}


@pytest.mark.parametrize('point', ['between_parts', 'between_renames'])
def test_sigkill_of_rank0_during_save_keeps_the_previous_checkpoint(tmp_path, point):
    """Rank 0 dies after the weights are written and before the sharded state (between_parts), or
    in the two-rename commit between retiring the old checkpoint and renaming the new one in
    (between_renames). The previous checkpoint resumes; the next save removes the leftovers."""
    done = torchrun('save_killed', tmp_path, point)
    assert done.returncode != 0 and 'SIGKILL' in done.stderr, done.stderr[-3000:]
    leftovers = sorted(name for name in os.listdir(tmp_path) if name.startswith('ck.'))
    assert leftovers and all(name.startswith(('ck.tmp-', 'ck.old-')) for name in leftovers), leftovers
    previous = tmp_path / 'ck' if (tmp_path / 'ck').exists() else tmp_path / next(
        name for name in leftovers if name.startswith('ck.old-'))
    assert {'adapter_model.safetensors', 'sharded/.metadata'} <= set(digests(previous))

    done = torchrun('resume', tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    resumed = result(tmp_path, 'resume', 0)
    assert resumed['resumed_optimizer_steps'] == 1  # the first save's state, not the killed one's
    assert [name for name in resumed['listing'] if name.startswith('ck')] == ['ck']
    assert {'adapter_model.safetensors', 'sharded/.metadata'} <= set(digests(tmp_path / 'ck'))


def test_default_timeout_is_stated_and_applied(tmp_path):
    done = torchrun('default_timeout', tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    for rank in (0, 1):
        assert result(tmp_path, 'default_timeout', rank) == {
            'timeout_s': DEFAULT_CPU_TIMEOUT.total_seconds(), 'twinkle_timeout_s': DEFAULT_CPU_TIMEOUT.total_seconds()}


def test_peer_killed_at_a_step_boundary_is_named_fast(tmp_path):
    done = torchrun('peer_killed', tmp_path)
    assert done.returncode != 0 and 'SIGKILL' in done.stderr, done.stderr[-3000:]
    survivor = result(tmp_path, 'peer_killed', 0)
    assert survivor['error'] is not None, survivor
    assert 'failed on rank 0 of 2' in survivor['error'] and 'rank 1' in survivor['error']
    assert survivor['seconds'] < DEFAULT_CPU_TIMEOUT.total_seconds() / 10  # a dead peer is not a stall


def test_ranks_with_different_step_counts_fail_with_a_message(tmp_path):
    torchrun('uneven_data', tmp_path)  # the exit code is not asserted: gloo may abort while the ranks exit
    for rank in (0, 1):
        seen = result(tmp_path, 'uneven_data', rank)
        assert seen['steps'] == 0, seen
        assert 'rank 0: 2 steps' in seen['error'] and 'rank 1: 4 steps' in seen['error'], seen['error']


def one_process(job: str, out: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(JOBS), job, str(out), *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)


def test_checkpoint_of_two_ranks_resumes_exactly_in_one_process(tmp_path):
    """The sharded (DCP) resume state reshards onto one process: the next two losses are the ones the
    two-rank job computed (the second one depends on the restored AdamW moments)."""
    done = torchrun('moved', tmp_path, 'save')
    assert done.returncode == 0, done.stderr[-4000:]
    saved = result(tmp_path, 'moved', 0)
    done = one_process('moved', tmp_path, 'resume')
    assert done.returncode == 0, done.stderr[-4000:]
    resumed = result(tmp_path, 'moved', 0)
    assert (saved['world'], resumed['world']) == (2, 1)
    assert resumed['losses'] == pytest.approx(saved['losses'], rel=1e-5)


def test_one_process_checkpoint_resumed_on_two_ranks_says_the_world_size_differs(tmp_path):
    done = one_process('moved', tmp_path, 'save')
    assert done.returncode == 0, done.stderr[-4000:]
    done = torchrun('moved', tmp_path, 'resume')
    assert done.returncode == 0, done.stderr[-4000:]
    for rank in (0, 1):
        error = result(tmp_path, 'moved', rank)['error']
        assert 'saved by one process' in error and 'resumed on 2 ranks' in error, error
