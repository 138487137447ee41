"""API keys: stored as SHA-256 digests (never the key), each mapped to exactly one tenant."""
from __future__ import annotations

import hashlib
import hmac
import re
from typing import Dict, Iterable, Optional

NAME_PATTERN = r'^[A-Za-z0-9_-]{1,64}$'  # tenants, adapters, checkpoints: safe in paths and peft names


def hash_key(key: str) -> str:
    return 'sha256:' + hashlib.sha256(key.encode('utf-8')).hexdigest()


def check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not re.match(NAME_PATTERN, name):
        raise ValueError(f'{kind} {name!r} must be 1-64 letters, digits, "_" or "-"')
    return name


class Keyring:
    """``{hash_key(key): tenant}``; ``tenant_of(key)`` compares digests in constant time."""

    def __init__(self, hashed: Dict[str, str]):
        for digest, tenant in hashed.items():
            if not digest.startswith('sha256:'):
                raise ValueError(f'api key entries must be hash_key() digests ("sha256:..."), got {digest[:12]!r}...')
            check_name('tenant', tenant)
        self._hashed = dict(hashed)

    @classmethod
    def from_pairs(cls, pairs: Iterable[str]) -> 'Keyring':
        """``KEY=TENANT`` strings (the command line's ``--api-key``); the keys are hashed at once."""
        hashed = {}
        for pair in pairs:
            key, sep, tenant = pair.partition('=')
            if not sep or not key or not tenant:
                raise ValueError(f'--api-key takes KEY=TENANT, got {pair[:3]!r}...')
            if hash_key(key) in hashed:
                raise ValueError('the same api key is given twice: a key maps to one tenant')
            hashed[hash_key(key)] = check_name('tenant', tenant)
        return cls(hashed)

    def digests(self) -> Dict[str, str]:
        """``{digest: tenant}``: what a config file stores (never the keys)."""
        return dict(self._hashed)

    def tenant_of(self, key: Optional[str]) -> Optional[str]:
        if not key:
            return None
        digest = hash_key(key)
        for known, tenant in self._hashed.items():
            if hmac.compare_digest(known, digest):
                return tenant
        return None
