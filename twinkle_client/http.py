"""The HTTP session every client class shares: the key, timeouts, retries of 429, errors with their status."""
from __future__ import annotations

import time
from typing import Any, Optional


class ServiceError(RuntimeError):
    """The service answered with an error; ``status`` is the HTTP code, the message its ``detail``."""

    def __init__(self, status: int, detail: Any, method: str, path: str):
        super().__init__(f'{method} {path} -> {status}: {detail}')
        self.status, self.detail = status, detail


class TwinkleClient:
    """``timeout``: seconds per request; a 429 (the tenant's queue is full) is retried up to
    ``retries_429`` times with growing pauses, then raised."""

    def __init__(self, base_url: str, api_key: str, timeout: float = 600.0, retries_429: int = 20):
        import requests
        self.base_url, self.timeout, self.retries_429 = base_url.rstrip('/'), timeout, retries_429
        self.session = requests.Session()
        self.session.headers['Authorization'] = f'Bearer {api_key}'

    def request(self, method: str, path: str, json: Optional[dict] = None) -> Any:
        for attempt in range(self.retries_429 + 1):
            response = self.session.request(method, self.base_url + path, json=json, timeout=self.timeout)
            if response.status_code != 429 or attempt == self.retries_429:
                break
            time.sleep(min(0.05 * 2 ** attempt, 2.0))
        if response.status_code >= 400:
            try:
                detail = response.json().get('detail')
            except ValueError:
                detail = response.text[:500]
            raise ServiceError(response.status_code, detail, method, path)
        return response.json()

    def get_server_capabilities(self) -> dict:
        return self.request('GET', '/v1/capabilities')

    def list_adapters(self) -> list:
        return self.request('GET', '/v1/adapters')['adapters']

    def list_checkpoints(self) -> list:
        return self.request('GET', '/v1/checkpoints')['checkpoints']

    def delete_checkpoint(self, name: str) -> None:
        self.request('DELETE', f'/v1/checkpoints/{name}')


_client: Optional[TwinkleClient] = None


def init_twinkle_client(base_url: str, api_key: str, **kwargs) -> TwinkleClient:
    """Connect (and check the key) once; the client classes use this connection unless given another."""
    global _client
    client = TwinkleClient(base_url, api_key, **kwargs)
    client.get_server_capabilities()
    _client = client
    return client


def get_client(client: Optional[TwinkleClient] = None) -> TwinkleClient:
    if client is not None:
        return client
    if _client is None:
        raise RuntimeError('call twinkle_client.init_twinkle_client(base_url=..., api_key=...) first')
    return _client
