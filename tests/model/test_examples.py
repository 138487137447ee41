"""The seeds' single-device example runs unchanged but for the model and data ids (fewer samples)."""
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_single_device_example_trains_and_saves(tmp_path):
    env = dict(os.environ, NUM_SAMPLES='48', HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1')
    result = subprocess.run([sys.executable, str(ROOT / 'examples' / 'single_device.py')], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'Current is step 0 of 6' in result.stderr
    assert (tmp_path / 'last-checkpoint' / 'adapter_model.safetensors').exists()
