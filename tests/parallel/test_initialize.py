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
