"""twinkle.initialize: argument checks and the mesh/world-size check, before any process group exists."""
import datetime
import random

import pytest
import torch

import twinkle
from twinkle import DeviceMesh
from twinkle.parallel import global_mesh


@pytest.fixture(autouse=True)
def single_process_env(monkeypatch):
    for name in ('RANK', 'WORLD_SIZE'):
        monkeypatch.delenv(name, raising=False)


def test_single_process_records_the_mesh_and_seeds(monkeypatch):
    mesh = DeviceMesh.from_sizes()
    device = twinkle.initialize(mode='local', global_device_mesh=mesh, seed=3, timeout=5)
    first = (random.random(), torch.rand(1))
    twinkle.initialize(seed=3)
    assert (random.random(), torch.rand(1)) == first
    assert device is twinkle.backends.current()
    assert global_mesh().dims == {'dp': 1, 'fsdp': 1}


def test_mesh_larger_than_one_process_is_refused():
    with pytest.raises(ValueError, match=r'2 ranks \(fsdp_size=2\) but this is a single process'):
        twinkle.initialize(global_device_mesh=DeviceMesh.from_sizes(fsdp_size=2))


def test_mesh_and_world_size_mismatch_names_both(monkeypatch):
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setenv('WORLD_SIZE', '2')
    mesh = DeviceMesh.from_sizes(dp_size=2, fsdp_size=2)
    with pytest.raises(ValueError, match=r'4 ranks \(dp_size=2 x fsdp_size=2\) but torchrun started WORLD_SIZE=2'):
        twinkle.initialize(global_device_mesh=mesh)


def test_modes():
    with pytest.raises(ValueError, match=r"mode='ray'\) needs groups=\[DeviceGroup"):
        twinkle.initialize(mode='ray', groups=[])
    with pytest.raises(TypeError, match="mode='ray'.*nproc_per_nod; valid: groups"):
        twinkle.initialize(mode='ray', groups=[], nproc_per_nod=8)
    with pytest.raises(ValueError, match='mode'):
        twinkle.initialize(mode='slurm')
    with pytest.raises(TypeError, match='nproc_per_node'):
        twinkle.initialize(nproc_per_node=8)


@pytest.mark.parametrize('timeout', [0, -1.0, '10s', datetime.timedelta(0)])
def test_bad_timeout_is_named(timeout):
    with pytest.raises(ValueError, match='timeout'):
        twinkle.initialize(timeout=timeout)


def test_bad_mesh_is_named():
    with pytest.raises(ValueError, match='global_device_mesh'):
        twinkle.initialize(global_device_mesh={'fsdp': 2})


def test_the_process_group_is_destroyed_at_exit(tmp_path):
    """Left to the interpreter's teardown a gloo group can abort a finished job (pytorch#190489)."""
    import socket
    import subprocess
    import sys
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        port = probe.getsockname()[1]
    code = ('import atexit, torch.distributed as dist, twinkle\n'
            'twinkle.initialize(timeout=60)\n'
            'assert dist.is_initialized()\n'
            'atexit._run_exitfuncs()\n'
            'print("still initialized:", dist.is_initialized())')
    env = dict(__import__('os').environ, RANK='0', WORLD_SIZE='1', LOCAL_RANK='0', MASTER_ADDR='127.0.0.1',
               MASTER_PORT=str(port), TWINKLE_DEVICE='cpu')
    result = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'still initialized: False' in result.stdout
