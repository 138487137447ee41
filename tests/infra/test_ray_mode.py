"""Ray mode on a local cluster: groups become rank actors, remote_group= proxies, named failures."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip('ray', reason="Ray mode needs the 'ray' extra")

import twinkle  # noqa: E402
from twinkle import DeviceGroup, DeviceMesh  # noqa: E402
from twinkle.infra.ray_mode import shutdown_ray  # noqa: E402
from twinkle.utils.process_state import use_process_state  # noqa: E402

from . import ray_components  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault('RAY_AUTH_MODE', 'disabled')


@pytest.fixture(scope='module')
def cluster():
    """One local cluster with two CPU groups, 'pair' (2 ranks) and 'solo' (1), for the in-process tests."""
    ray.cloudpickle.register_pickle_by_value(ray_components)
    with use_process_state():
        handle = twinkle.initialize(mode='ray', groups=[DeviceGroup('pair', ranks=2, device_type='cpu'),
                                                        DeviceGroup('solo', ranks=[2], device_type='cpu')],
                                    global_device_mesh=DeviceMesh.from_sizes(fsdp_size=2), lazy_collect=True,
                                    call_timeout=120)
        yield handle
        shutdown_ray()


def test_groups_beyond_the_cluster_fail_at_once_naming_what_is_missing():
    with use_process_state():
        started = time.monotonic()
        with pytest.raises(ValueError, match=r"DeviceGroup 'gpus' needs 1 x GPU .* but the Ray cluster has CPU"):
            twinkle.initialize(mode='ray', groups=[DeviceGroup('gpus', ranks=1, device_type='GPU')])
        assert time.monotonic() - started < 60
        assert not ray.is_initialized()  # the cluster it started is gone again
        shutdown_ray()


def test_overlapping_or_odd_groups_are_refused_before_any_cluster_starts():
    with use_process_state():
        with pytest.raises(ValueError, match=r"'sampler' and 'model' both claim ranks \[1\]"):
            twinkle.initialize(mode='ray', groups=[DeviceGroup('model', ranks=[0, 1]),
                                                   DeviceGroup('sampler', ranks=[1, 2])])
        with pytest.raises(ValueError, match="device_type='tpu' is not one of"):
            twinkle.initialize(mode='ray', groups=[DeviceGroup('x', ranks=1, device_type='tpu')])
        with pytest.raises(ValueError, match='global_device_mesh has 4 ranks .* more than any group holds'):
            twinkle.initialize(mode='ray', groups=[DeviceGroup('x', ranks=2)],
                               global_device_mesh=DeviceMesh.from_sizes(fsdp_size=4))
        assert not ray.is_initialized()


def test_without_ray_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, 'ray', None)
    with use_process_state():
        with pytest.raises(ImportError, match=r"pip install 'twinkle\[ray\]'"):
            twinkle.initialize(mode='ray', groups=[DeviceGroup('x', ranks=1)])


def test_remote_group_is_ignored_outside_a_ray_driver():
    probe = ray_components.Probe(tag='local', remote_group='anything')
    assert isinstance(probe, ray_components.Probe) and probe.tag == 'local'


def _environ_has(pid: int, marker: str) -> bool:
    try:
        return marker.encode() in Path(f'/proc/{pid}/environ').read_bytes()
    except OSError:
        return False


def test_a_killed_actor_fails_the_call_by_group_and_rank_and_leaves_no_process(tmp_path):
    marker = f'TWINKLE_RAY_TEST_MARKER={os.getpid()}-{time.time_ns()}'
    env = dict(os.environ, TWINKLE_RAY_TEST_MARKER=marker.split('=', 1)[1], RAY_AUTH_MODE='disabled')
    out = tmp_path / 'report.json'
    subprocess.run([sys.executable, str(ROOT / 'tests' / 'infra' / 'ray_dead_actor_job.py'), str(out)], env=env,
                   cwd=tmp_path, timeout=300, check=True, capture_output=True)
    report = json.loads(out.read_text())
    assert re.search(r"group 'victims': rank 1 \(pid \d+\) died during sleep", report['error']), report
    assert report['seconds_to_error'] < 30, report  # stated bound: Ray reports a dead worker within seconds
    assert "group 'victims' was stopped earlier" in report['later_call']
    deadline = time.monotonic() + 30
    while True:  # the cluster's processes (raylet, GCS, workers) all inherit the marker
        left = [int(pid) for pid in os.listdir('/proc') if pid.isdigit() and _environ_has(int(pid), marker)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not left, f'processes left behind: {left}'


# -- on one shared cluster (started at the first of these tests, after the ones above) --------------
def test_each_rank_runs_with_the_torchrun_environment_and_its_own_process_group(cluster):
    probe = ray_components.Probe(remote_group='pair')
    seen = probe.remote_apply(ray_components.Probe.where)
    assert [where['RANK'] for where in seen] == ['0', '1']
    assert {where['WORLD_SIZE'] for where in seen} == {'2'} and {where['dist_world'] for where in seen} == {2}
    assert [where['dist_rank'] for where in seen] == [0, 1]
    assert [where['LOCAL_RANK'] for where in seen] == ['0', '1'] and seen[0]['LOCAL_WORLD_SIZE'] == '2'
    assert seen[0]['MASTER_ADDR'] == seen[1]['MASTER_ADDR'] and seen[0]['TWINKLE_DEVICE'] == 'cpu'
    solo = ray_components.Probe(remote_group='solo').remote_apply(ray_components.Probe.where)
    assert solo[0]['WORLD_SIZE'] == '1' and solo[0]['MASTER_PORT'] != seen[0]['MASTER_PORT']
    assert probe.total(3).result() == 6.0  # a collective over the group's own process group


def test_per_sample_arguments_are_cut_as_the_dataloader_cuts_them(cluster):
    from twinkle.dataloader.dataloader import data_share
    probe = ray_components.Probe(remote_group='pair')
    items = list(range(7))
    assert probe.echo(items, suffix='!').result() == [f'{i}!@{0 if i in data_share(items, 0, 2) else 1}'
                                                        for i in items]
    combined = probe.loss_of([1, 2, 3, 4, 5]).result()  # rank 0: [1, 2, 3] (mean 2), rank 1: [4, 5] (mean 4.5)
    assert combined == {'loss': pytest.approx((2 * 3 + 4.5 * 2) / 5, rel=1e-12), 'num_tokens': 5}
    with pytest.raises(ValueError, match='items has 1 samples for 2 data ranks'):
        probe.echo([1])


def test_lazy_results_resolve_on_use_and_keep_call_order(cluster):
    probe = ray_components.Probe(remote_group='pair')
    started = time.monotonic()
    pending = probe.sleep(3.0)
    assert time.monotonic() - started < 2.5  # not waited for yet
    later = probe.echo(['a', 'b'])
    assert later == ['a@0', 'b@1'] and pending.result() == 3.0 and float(pending) == 3.0
    assert time.monotonic() - started >= 3.0  # echo ran after sleep on each rank: call order kept


def test_a_rank_raising_gives_its_error_type_naming_group_and_rank(cluster):
    probe = ray_components.Probe(remote_group='pair')
    failed = probe.fail('bad argument: steps')
    with pytest.raises(ValueError, match=r"bad argument: steps \[raised by group 'pair' rank 0 in fail\]"):
        failed.result()
    assert probe.echo(['still', 'usable']) == ['still@0', 'usable@1']  # every rank failed alike: group kept


def test_bad_remote_groups_and_meshes_are_named(cluster):
    with pytest.raises(ValueError, match=r"remote_group='nope' names no group; .*: pair, solo"):
        ray_components.Probe(remote_group='nope')
    with pytest.raises(ValueError, match=r"device_mesh has 4 ranks \(fsdp_size=4\) but remote_group 'pair' has 2"):
        ray_components.Probe(device_mesh=DeviceMesh.from_sizes(fsdp_size=4), remote_group='pair')
