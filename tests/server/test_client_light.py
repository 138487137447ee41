"""twinkle_client's model and sampler import without torch (a client machine needs only requests)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_client_model_and_sampler_import_without_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['twinkle'] = None\n"
            "import twinkle_client, twinkle_client.model, twinkle_client.sampler\n"
            "print('ok', sorted(m for m, v in sys.modules.items() if v is not None and m.startswith(('torch', 'twinkle'))"
            "             and not m.startswith('twinkle_client')))")
    result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'ok []'


def test_client_calls_need_a_connection_first():
    code = ("from twinkle_client.model import MultiLoraTransformersModel\n"
            "try:\n    MultiLoraTransformersModel()\nexcept RuntimeError as error:\n    print(error)")
    result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert 'call twinkle_client.init_twinkle_client(base_url=..., api_key=...) first' in result.stdout
