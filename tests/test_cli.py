"""`twinkle env`: the bug-report table, as a console script and as `python -m twinkle env`."""
import subprocess
import sys

from twinkle import kernels
from twinkle.cli import main


def test_env_report_lists_device_packages_and_kernels(capsys):
    assert main(['env']) == 0
    out = capsys.readouterr().out
    for expected in ('torch', 'device', 'supports_bf16', 'dist_backend', 'cpu tuning', 'triton',
                     'liger-kernel', 'kernels (op'):
        assert expected in out
    for op in kernels.ops():
        assert op in out


def test_python_dash_m_twinkle_env():
    result = subprocess.run([sys.executable, '-m', 'twinkle', 'env'], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert 'rms_norm' in result.stdout
