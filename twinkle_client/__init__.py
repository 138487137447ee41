"""twinkle_client: the local classes' methods, run by a Twinkle training service over HTTP.

    from twinkle_client import init_twinkle_client
    from twinkle_client.model import MultiLoraTransformersModel
    init_twinkle_client(base_url='http://127.0.0.1:8000', api_key='KEY')

The model and sampler classes need only ``requests`` (no torch); ``twinkle_client.dataset`` and
``twinkle_client.dataloader`` are twinkle's own Dataset and DataLoader (the data is prepared on the
client and sent as encoded features), so they need twinkle installed.
"""
from .http import ServiceError, TwinkleClient, get_client, init_twinkle_client

__all__ = ['ServiceError', 'TwinkleClient', 'get_client', 'init_twinkle_client']
