"""Hub routing: ms:// and hf:// ids go to their hub (fake clients here), local paths are used as
they are, and what cannot be fetched offline fails with one clear error."""
import sys
import types

import pytest

from twinkle import hub
from twinkle.dataset import Dataset, DatasetMeta


def test_locate(tmp_path, monkeypatch):
    monkeypatch.delenv('TWINKLE_HUB', raising=False)
    assert hub.locate('ms://Qwen/Qwen3-0.6B') == (hub.MODELSCOPE, 'Qwen/Qwen3-0.6B')
    assert hub.locate('hf://Qwen/Qwen3-0.6B') == (hub.HUGGINGFACE, 'Qwen/Qwen3-0.6B')
    assert hub.locate(str(tmp_path)) == (hub.LOCAL, str(tmp_path))
    assert hub.locate('Qwen/Qwen3-0.6B') == (hub.MODELSCOPE, 'Qwen/Qwen3-0.6B')
    monkeypatch.setenv('TWINKLE_HUB', 'hf')
    assert hub.locate('Qwen/Qwen3-0.6B') == (hub.HUGGINGFACE, 'Qwen/Qwen3-0.6B')
    monkeypatch.setenv('TWINKLE_HUB', 'github')
    with pytest.raises(ValueError, match='TWINKLE_HUB must be "ms" or "hf"'):
        hub.locate('a/b')
    with pytest.raises(ValueError, match='non-empty string'):
        hub.locate('')


def test_local_directory_is_used_as_is(tmp_path):
    assert hub.model_dir(str(tmp_path)) == str(tmp_path)
    with pytest.raises(ValueError, match='is a local path'):
        hub.load_dataset(str(tmp_path))


def test_modelscope_routing_with_a_fake_client(monkeypatch):
    calls = []

    class MsDataset:
        @staticmethod
        def load(name, **kwargs):
            calls.append(('dataset', name, kwargs))
            return types.SimpleNamespace(to_hf_dataset=lambda: ['converted'])

    def snapshot_download(name, revision=None):
        calls.append(('model', name, revision))
        return f'/cache/{name}'

    fake = types.ModuleType('modelscope')
    fake.MsDataset, fake.snapshot_download = MsDataset, snapshot_download
    monkeypatch.setitem(sys.modules, 'modelscope', fake)
    monkeypatch.setattr(hub, 'has_package', lambda name: True)
    assert hub.model_dir('ms://Qwen/Qwen3-0.6B', revision='v1') == '/cache/Qwen/Qwen3-0.6B'
    assert hub.load_dataset('ms://swift/self-cognition', 'default', 'train') == ['converted']
    dataset_call = ('dataset', 'swift/self-cognition', dict(subset_name='default', split='train', use_streaming=False))
    assert calls == [('model', 'Qwen/Qwen3-0.6B', 'v1'), dataset_call]


def test_missing_client_says_what_to_install(monkeypatch):
    monkeypatch.setattr(hub, 'has_package', lambda name: False)
    with pytest.raises(hub.HubUnavailableError, match='needs `pip install modelscope`'):
        hub.model_dir('ms://Qwen/Qwen3-0.6B')


def test_offline_hugging_face_fails_clearly(monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    with pytest.raises(hub.HubUnavailableError, match="could not fetch 'hf://twinkle-test/absent'.*local path"):
        hub.model_dir('hf://twinkle-test/absent')
    with pytest.raises(hub.HubUnavailableError, match="could not fetch 'hf://twinkle-test/absent-data'"):
        Dataset(DatasetMeta('hf://twinkle-test/absent-data'))
