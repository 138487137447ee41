"""Where a model or dataset id lives, and fetching it from there.

``ms://org/name`` is ModelScope, ``hf://org/name`` is Hugging Face, an existing local path is used
as-is, and a bare ``org/name`` goes to the default hub (ModelScope, the seeds' default; set
``TWINKLE_HUB=hf`` to change it). The hub clients are imported only when an id needs them, and a
fetch that cannot happen (client missing, offline mode, no network, no such repo) raises
``HubUnavailableError`` saying what to do instead, rather than a bare client or socket error.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

from twinkle.backends import has_package

MODELSCOPE = 'modelscope'
HUGGINGFACE = 'huggingface'
LOCAL = 'local'

_PREFIXES = {'ms://': MODELSCOPE, 'hf://': HUGGINGFACE}
_CLIENTS = {MODELSCOPE: 'modelscope', HUGGINGFACE: 'huggingface_hub'}


class HubUnavailableError(RuntimeError):
    """A hub id could not be fetched here; the message says how to run without it."""


class Location(NamedTuple):
    hub: str   # MODELSCOPE, HUGGINGFACE or LOCAL
    name: str  # the id without its prefix, or the local path


def locate(resource_id: str) -> Location:
    """Which hub ``resource_id`` refers to, without touching the network."""
    if not isinstance(resource_id, str) or not resource_id:
        raise ValueError(f'a model or dataset id must be a non-empty string, got {resource_id!r}')
    for prefix, hub in _PREFIXES.items():
        if resource_id.startswith(prefix):
            return Location(hub, resource_id[len(prefix):])
    if os.path.exists(resource_id):
        return Location(LOCAL, resource_id)
    if _looks_like_a_path(resource_id):
        raise FileNotFoundError(f'{resource_id!r} does not exist (it is a local path, not a hub id: hub ids are '
                                f'"org/name", "ms://org/name" or "hf://org/name")')
    default = os.environ.get('TWINKLE_HUB', 'ms')
    if default not in ('ms', 'hf'):
        raise ValueError(f'TWINKLE_HUB must be "ms" or "hf", got {default!r}')
    return Location(_PREFIXES[f'{default}://'], resource_id)


def _looks_like_a_path(resource_id: str) -> bool:
    """Absolute, relative (./, ../, ~), more than org/name deep, or with a file suffix: never a hub id."""
    if os.path.isabs(resource_id) or resource_id.startswith(('.', '~')) or '\\' in resource_id:
        return True
    if resource_id.count('/') > 1:
        return True
    suffix = os.path.splitext(resource_id)[1].lower()
    return suffix in _FILE_SUFFIXES


_FILE_SUFFIXES = ('.json', '.jsonl', '.csv', '.parquet', '.txt', '.safetensors', '.bin', '.pt', '.arrow')


def model_dir(model_id: str, revision: Optional[str] = None) -> str:
    """A local directory holding ``model_id`` (downloaded on first use for hub ids)."""
    location = locate(model_id)
    if location.hub == LOCAL:
        return location.name
    _require_client(model_id, location.hub)
    try:
        if location.hub == MODELSCOPE:
            from modelscope import snapshot_download
        else:
            from huggingface_hub import snapshot_download
        return snapshot_download(location.name, revision=revision)
    except Exception as error:  # any client failure: network, auth, missing repo
        raise _unavailable(model_id, location.hub, error) from error


def load_dataset(dataset_id: str, subset_name: str = 'default', split: str = 'train', streaming: bool = False):
    """A ``datasets`` dataset for a hub id (local files are loaded by ``twinkle.dataset``)."""
    location = locate(dataset_id)
    if location.hub == LOCAL:
        raise ValueError(f'{dataset_id!r} is a local path: load it with twinkle.dataset.Dataset')
    _require_client(dataset_id, location.hub)
    subset = None if subset_name == 'default' else subset_name
    try:
        if location.hub == MODELSCOPE:
            from modelscope import MsDataset
            dataset = MsDataset.load(location.name, subset_name=subset_name, split=split,
                                     use_streaming=streaming)
            # Depending on the dataset's format ModelScope returns an MsDataset wrapper or the HF object.
            return dataset.to_hf_dataset() if hasattr(dataset, 'to_hf_dataset') else dataset
        import datasets
        return datasets.load_dataset(location.name, subset, split=split, streaming=streaming)
    except Exception as error:
        raise _unavailable(dataset_id, location.hub, error) from error


def upload(local_dir: str, hub_id: str, private: bool = True) -> str:
    """Push a directory to ``ms://org/name`` or ``hf://org/name`` (created private unless ``private=False``);
    returns the hub id. Unreachable hubs raise ``HubUnavailableError``."""
    location = locate(hub_id)
    if location.hub == LOCAL:
        raise ValueError(f'hub_id must be a hub repository ("ms://org/name" or "hf://org/name"), got {hub_id!r}')
    _require_client(hub_id, location.hub)
    try:
        if location.hub == HUGGINGFACE:
            from huggingface_hub import HfApi
            api = HfApi()
            api.create_repo(location.name, private=private, exist_ok=True)
            api.upload_folder(folder_path=local_dir, repo_id=location.name)
        else:
            from modelscope.hub.api import HubApi
            api = HubApi()
            api.create_repo(location.name, visibility='private' if private else 'public', exist_ok=True)
            api.upload_folder(repo_id=location.name, folder_path=local_dir)
    except Exception as error:
        reason = ' '.join(str(error).split())
        raise HubUnavailableError(f'could not push to {hub_id!r} on {location.hub} ({type(error).__name__}: '
                                  f'{reason}); offline, or no token with write access?') from error
    return hub_id


def _require_client(resource_id: str, hub: str) -> None:
    client = _CLIENTS[hub]
    if not has_package(client):
        raise HubUnavailableError(f'{resource_id!r} is on {hub}, which needs `pip install {client}`; '
                                  f'or pass a local path (twinkle.assets has offline models and data)')


def _unavailable(resource_id: str, hub: str, error: Exception) -> HubUnavailableError:
    reason = ' '.join(str(error).split())  # client messages span lines; keep ours on one
    return HubUnavailableError(f'could not fetch {resource_id!r} from {hub} ({type(error).__name__}: {reason}); '
                               f'offline? pass a local path instead (twinkle.assets has offline models and data)')
