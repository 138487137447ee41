"""`twinkle serve --model M --host 127.0.0.1 --port P --api-key KEY=TENANT`, the command line's contract."""
import os
import subprocess
import sys
import time

import pytest
import requests

from twinkle import assets

from .conftest import free_port


def wait_healthy(url: str, process, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f'the server exited with {process.returncode}: {process.stderr.read()[-3000:]}')
        try:
            if requests.get(f'{url}/v1/health', timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.25)
    raise AssertionError(f'the server was not healthy within {seconds} s')


@pytest.mark.parametrize('entry', [['-m', 'twinkle.cli', 'serve'], ['-m', 'twinkle.server']])
def test_serve_from_the_command_line_answers_its_keys_only(tmp_path, entry):
    port = free_port()
    command = [sys.executable, *entry, '--model', assets.tiny_model_path('qwen3'), '--host', '127.0.0.1',
               '--port', str(port), '--api-key', 'secret-1=team_a', '--api-key', 'secret-2=team_b',
               '--checkpoint-dir', str(tmp_path / 'ckpt')]
    env = dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1')
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f'http://127.0.0.1:{port}'
        wait_healthy(url, process)
        answer = requests.get(f'{url}/v1/capabilities', headers={'Authorization': 'Bearer secret-2'}, timeout=30)
        assert answer.status_code == 200 and answer.json()['tenant'] == 'team_b'
        assert requests.get(f'{url}/v1/capabilities', headers={'Authorization': 'Bearer secret-3'},
                            timeout=30).status_code == 401
        schema = requests.get(f'{url}/openapi.json', timeout=30).json()
        assert all(path.startswith('/v1/') for path in schema['paths'])
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_serve_without_keys_or_model_says_what_is_missing():
    result = subprocess.run([sys.executable, '-m', 'twinkle.cli', 'serve', '--model', 'x'], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0 and 'no API keys; pass --api-key KEY=TENANT' in result.stderr
    result = subprocess.run([sys.executable, '-m', 'twinkle.cli', 'serve', '--api-key', 'k=t'], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0 and 'pass --model MODEL_ID or --config server.yaml' in result.stderr
