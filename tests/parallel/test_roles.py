"""split_torchrun gives each role its own world; ObjectChannel hands objects over with bounded waits."""
import socket
import threading
import time

import pytest

from twinkle.parallel.roles import ChannelTimeout, ObjectChannel, split_torchrun


def torchrun_env(monkeypatch, rank, world_size, port=29500):
    for name, value in (('RANK', rank), ('WORLD_SIZE', world_size), ('MASTER_ADDR', '127.0.0.1'),
                        ('MASTER_PORT', port), ('TORCHELASTIC_USE_AGENT_STORE', 'True')):
        monkeypatch.setenv(name, str(value))


@pytest.mark.parametrize('rank, name, role_rank, port', [(0, 'model', 0, 29501), (1, 'model', 1, 29501),
                                                         (2, 'sampler', 0, 29502)])
def test_each_rank_gets_its_roles_world(monkeypatch, rank, name, role_rank, port):
    import os
    torchrun_env(monkeypatch, rank, 3)
    role = split_torchrun({'model': 2, 'sampler': 1})
    assert (role.name, role.rank, role.size if name == 'model' else 1) == (name, role_rank, 2 if name == 'model' else 1)
    assert (role.job_rank, role.job_size) == (rank, 3)
    assert os.environ['RANK'] == str(role_rank) and os.environ['MASTER_PORT'] == str(port)
    assert os.environ['WORLD_SIZE'] == str(role.size)
    assert os.environ['TORCHELASTIC_USE_AGENT_STORE'] == 'False'  # the role's rank 0 hosts its store
    assert role.port(0) == 29503 and role.port(1) == 29504  # above every role world's port


def test_bad_roles_are_named(monkeypatch):
    torchrun_env(monkeypatch, 0, 2)
    with pytest.raises(ValueError, match='need 3 ranks but torchrun started WORLD_SIZE=2'):
        split_torchrun({'model': 2, 'sampler': 1})
    with pytest.raises(ValueError, match='positive ints'):
        split_torchrun({'model': 0, 'sampler': 2})
    monkeypatch.delenv('RANK')
    with pytest.raises(RuntimeError, match='RANK not set'):
        split_torchrun({'model': 1, 'sampler': 1})


def free_port():
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def test_objects_reach_every_reader_once_and_are_then_deleted():
    port = free_port()
    hosted = {}
    joining = threading.Thread(target=lambda: hosted.update(
        host=ObjectChannel('127.0.0.1', port, is_host=True, world_size=2, timeout=10)))
    joining.start()
    peer = ObjectChannel('127.0.0.1', port, is_host=False, world_size=2, timeout=10)
    joining.join(10)
    host = hosted['host']
    value = {'inputs': [[1, 2, 3]], 'advantages': [0.5]}
    threading.Timer(0.2, peer.put, args=('rollout/1', value), kwargs={'readers': 2}).start()
    assert host.get('rollout/1') == value  # waits for the put
    assert peer.get('rollout/1') == value
    assert not host._store.check(['rollout/1'])  # the last reader deleted it
    with pytest.raises(ValueError, match='readers must be a positive int'):
        host.put('x', 1, readers=0)


def test_a_stalled_peer_fails_the_reader_within_the_named_timeout():
    channel = ObjectChannel('127.0.0.1', free_port(), is_host=True, world_size=1, timeout=1.0)
    started = time.monotonic()
    with pytest.raises(ChannelTimeout, match="nothing put under 'rollout/7' within 1 s"):
        channel.get('rollout/7')
    assert time.monotonic() - started < 10


def test_a_missing_peer_fails_the_join_within_the_named_timeout():
    with pytest.raises(ChannelTimeout, match='2 processes did not all join within 1 s'):
        ObjectChannel('127.0.0.1', free_port(), is_host=True, world_size=2, timeout=1.0)
