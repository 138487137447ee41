"""DeviceMesh / DeviceGroup / get_device_placement without a process group (RANK from the env)."""
import pytest

import twinkle
from twinkle import DeviceGroup, DeviceMesh, get_device_placement


def test_from_sizes_orders_dims_outer_to_inner_and_keeps_dp_fsdp():
    mesh = DeviceMesh.from_sizes(tp_size=2, fsdp_size=2, dp_size=2, pp_size=1, ep_size=2)
    assert mesh.dim_names == ('dp', 'fsdp', 'ep', 'tp')
    assert mesh.shape == (2, 2, 2, 2) and mesh.world_size == 16
    assert mesh.size('pp') == 1 and mesh.size('ep') == 2
    assert DeviceMesh.from_sizes().dims == {'dp': 1, 'fsdp': 1}
    assert DeviceMesh.from_sizes(world_size=4, dp_size=4).dims == {'dp': 4, 'fsdp': 1}


def test_world_size_mismatch_names_every_size():
    with pytest.raises(ValueError, match=r'dp_size=2 x fsdp_size=4 = 8 ranks .* world_size=4'):
        DeviceMesh.from_sizes(world_size=4, fsdp_size=4, dp_size=2)


@pytest.mark.parametrize('argument, value', [('fsdp_size', 0), ('dp_size', -2), ('tp_size', 2.0),
                                             ('ulysses_size', True), ('world_size', 0)])
def test_bad_sizes_raise_naming_the_argument(argument, value):
    with pytest.raises(ValueError, match=argument):
        DeviceMesh.from_sizes(**{argument: value})


def test_unknown_dims_are_refused():
    with pytest.raises(ValueError, match='unknown names'):
        DeviceMesh({'dp': 2, 'zero': 2})
    with pytest.raises(ValueError, match="'zero'"):
        DeviceMesh.from_sizes().size('zero')


def test_coordinates_are_row_major_with_tp_innermost():
    mesh = DeviceMesh.from_sizes(dp_size=2, fsdp_size=3, tp_size=2)
    assert mesh.coordinate(0) == {'dp': 0, 'fsdp': 0, 'tp': 0}
    assert mesh.coordinate(1) == {'dp': 0, 'fsdp': 0, 'tp': 1}
    assert mesh.coordinate(7) == {'dp': 1, 'fsdp': 0, 'tp': 1}
    assert mesh.coordinate(11) == {'dp': 1, 'fsdp': 2, 'tp': 1}
    with pytest.raises(ValueError, match='rank 12'):
        mesh.coordinate(12)


@pytest.mark.parametrize('sizes', [dict(dp_size=2, fsdp_size=2, tp_size=2), dict(fsdp_size=2, ep_size=2, tp_size=2)],
                         ids=['dp_x_fsdp', 'ep_splits_data_ranks'])
def test_data_rank_counts_data_dims_and_tp_ranks_share_data(monkeypatch, sizes):
    mesh = DeviceMesh.from_sizes(**sizes)
    assert mesh.data_world_size == 4
    seen = []
    for rank in range(mesh.world_size):
        monkeypatch.setenv('RANK', str(rank))
        assert mesh.rank == rank
        seen.append(mesh.data_rank)
    assert seen == [0, 0, 1, 1, 2, 2, 3, 3]  # tp neighbours share; ep neighbours (ranks 0 and 2) do not


def test_placement_draws_the_grid_and_marks_this_rank(monkeypatch):
    monkeypatch.setenv('RANK', '6')
    drawing = get_device_placement(DeviceMesh.from_sizes(dp_size=2, fsdp_size=4, device_type='cpu'))
    lines = drawing.splitlines()
    assert lines[0] == 'DeviceMesh dp_size=2 x fsdp_size=4: 8 ranks on cpu'
    assert lines[1].split() == ['fsdp0', 'fsdp1', 'fsdp2', 'fsdp3']
    assert lines[2].split() == ['dp0', '0', '1', '2', '3']
    assert lines[3].split() == ['dp1', '4', '5', '6*', '7']
    assert lines[4] == 'this process (*): rank 6 at dp=1 fsdp=2, data slice 6 of 8'


def test_placement_defaults_to_the_global_mesh(monkeypatch):
    monkeypatch.delenv('RANK', raising=False)
    twinkle.initialize(global_device_mesh=DeviceMesh.from_sizes(device_type='cpu'))
    assert get_device_placement().startswith('DeviceMesh all sizes 1: 1 ranks on cpu')


def test_torch_mesh_needs_a_process_group():
    with pytest.raises(RuntimeError, match='twinkle.initialize'):
        DeviceMesh.from_sizes(fsdp_size=2).to_torch()
    with pytest.raises(ValueError, match="'tp' is not in this mesh"):
        DeviceMesh.from_sizes(fsdp_size=2).group('tp')


def test_device_group_expands_a_count():
    assert DeviceGroup('default', 3, 'cpu').ranks == [0, 1, 2]
    assert DeviceGroup('sampler', [4, 5]).ranks == [4, 5]
    for ranks in (0, [], [1, -1]):
        with pytest.raises(ValueError, match='ranks'):
            DeviceGroup('bad', ranks)


def test_the_data_group_is_the_world_when_every_rank_is_a_data_rank():
    import torch.distributed as dist
    assert DeviceMesh.from_sizes(dp_size=2, ep_size=2).data_group() is dist.group.WORLD
