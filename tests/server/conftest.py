"""A service on 127.0.0.1 in a background thread, stopped by the test (every wait bounded)."""
import socket
import threading
import time

import pytest

pytest.importorskip('fastapi', reason="the server needs the 'server' extra")
uvicorn = pytest.importorskip('uvicorn', reason="the server needs the 'server' extra")

from twinkle import assets  # noqa: E402
from twinkle.server.auth import hash_key  # noqa: E402
from twinkle.server.config import Quotas, ServerConfig  # noqa: E402

KEYS = {'key-a': 'alice', 'key-b': 'bob', 'key-c': 'carol', 'key-d': 'dave', 'key-e': 'erin', 'key-f': 'frank',
        'key-g': 'grace'}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


class RunningServer:
    def __init__(self, config: ServerConfig):
        from twinkle.server.app import create_app
        self.config = config
        self.app = create_app(config)
        self.url = f'http://127.0.0.1:{config.port}'
        self.server = uvicorn.Server(uvicorn.Config(self.app, host='127.0.0.1', port=config.port, log_level='warning'))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError('the test server did not start within 60 s')
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        self.app.state.service.close()


def make_config(tmp_path, **overrides) -> ServerConfig:
    values = dict(model_id=assets.tiny_model_path('qwen3'), port=free_port(),
                  api_keys={hash_key(key): tenant for key, tenant in KEYS.items()},
                  checkpoint_dir=str(tmp_path / 'checkpoints'), quotas=Quotas(max_queued=8, max_adapters=8),
                  request_timeout=120)
    values.update(overrides)
    return ServerConfig(**values)


@pytest.fixture(scope='session')
def server(tmp_path_factory):
    """One service for the tests that share it (each uses its own tenants or adapter names)."""
    with RunningServer(make_config(tmp_path_factory.mktemp('server'))) as running:
        yield running
