"""A twinkle DeviceMesh onto megatron-core's groups: for every rank, Megatron's tp, pp, cp and ep rank
is the mesh coordinate and its data-parallel rank is the mesh's data rank, with the same group
members; dims Megatron does not apply and a mesh that does not span the world fail before any group."""
import datetime

import megatron.core  # noqa: F401  (the suite installs the megatron extra)
import pytest
import torch.distributed as dist
from megatron.core import parallel_state

from twinkle import DeviceMesh
from twinkle.model.megatron import initialize_megatron_groups
from twinkle.model.megatron.parallel_state import check_rank_order

from .conftest import launch

KINDS = ('tp', 'pp', 'cp', 'dp', 'ep')


def expected_view(mesh: DeviceMesh, rank: int, monkeypatch) -> dict:
    """Megatron's rank and group members per kind, as the mesh says they must be."""
    monkeypatch.setenv('RANK', str(rank))  # no process group here: the mesh reads its rank from RANK
    here = mesh.coordinate(rank)
    view = {}
    for kind in KINDS:
        varying = ('dp', 'fsdp', 'ep') if kind == 'dp' else (kind,)
        members = [other for other in range(mesh.world_size)
                   if all(index == here[name] for name, index in mesh.coordinate(other).items() if name not in varying)]
        view[kind] = {'rank': mesh.data_rank if kind == 'dp' else here.get(kind, 0), 'members': members}
    return view


def assert_views_match(mesh: DeviceMesh, views: list, monkeypatch) -> None:
    assert len(views) == mesh.world_size
    for rank, view in enumerate(views):
        assert view == expected_view(mesh, rank, monkeypatch), f'{mesh.describe_sizes()}, rank {rank}'


@pytest.mark.parametrize('sizes', [dict(dp_size=2), dict(tp_size=2)])
def test_two_rank_groups_follow_the_mesh(gpt_job, sizes, monkeypatch):
    mesh = DeviceMesh.from_sizes(**sizes)
    key = 'dp2_view' if 'dp_size' in sizes else 'tp2_view'
    assert_views_match(mesh, [result[key] for result in gpt_job[0]], monkeypatch)


def test_four_rank_groups_follow_the_mesh(tmp_path, monkeypatch):
    from .groups_job import MESHES
    results, _ = launch('groups_job', 4, tmp_path, timeout=120)
    for sizes in MESHES:
        mesh = DeviceMesh.from_sizes(**sizes)
        assert_views_match(mesh, [result[mesh.describe_sizes()] for result in results], monkeypatch)


def test_mesh_larger_than_the_world_fails_before_any_group(gpt_job):
    for result in gpt_job[0]:
        assert 'device_mesh has 4 ranks (tp_size=4) but WORLD_SIZE=2' in result['world_size_error']
        assert result['initialized_after_error'] is False


@pytest.mark.parametrize('sizes, advice', [(dict(fsdp_size=2), 'use dp_size'), (dict(ulysses_size=2), 'use cp_size')])
def test_unapplied_dims_fail_before_any_group(sizes, advice):
    with pytest.raises(ValueError, match=f'device_mesh has {next(iter(sizes))}=2, which MegatronModel does not apply'
                                         f'.*{advice}'):
        initialize_megatron_groups(DeviceMesh.from_sizes(**sizes), timeout=datetime.timedelta(seconds=5))
    assert not dist.is_initialized() and not parallel_state.model_parallel_is_initialized()


@pytest.mark.parametrize('sizes', [dict(tp_size=2, pp_size=2, dp_size=2), dict(tp_size=2, cp_size=2, dp_size=2),
                                   dict(ep_size=4, tp_size=2), dict(pp_size=2, dp_size=2, ep_size=2)])
def test_layouts_agree_on_bigger_meshes(sizes):
    check_rank_order(DeviceMesh.from_sizes(**sizes))


def test_context_and_expert_parallel_together_are_refused():
    with pytest.raises(ValueError, match="Megatron's ep groups .* differ from the mesh's"):
        check_rank_order(DeviceMesh.from_sizes(cp_size=2, ep_size=2))
