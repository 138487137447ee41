"""Load on one service: 200 small requests from 20 clients at once, and a full queue answering 429."""
import concurrent.futures
import statistics
import threading
import time

import requests

from twinkle_client import TwinkleClient
from twinkle_client.model import MultiLoraTransformersModel

from .conftest import KEYS, RunningServer, make_config
from twinkle.server.config import Quotas

SAMPLE = {'input_ids': [3, 14, 15, 92, 65], 'labels': [3, 14, 15, 92, 65]}  # 4 trained tokens (labels shift)


def test_200_requests_from_20_clients_lose_no_update_and_get_no_5xx(server, capsys):
    keys = list(KEYS)[:4]
    for key in keys:  # one adapter per tenant that only accumulates: its token count tallies every request
        model = MultiLoraTransformersModel(client=TwinkleClient(server.url, key))
        model.add_adapter_to_model('tally', {'r': 2, 'lora_alpha': 4}, gradient_accumulation_steps=1024)
    latencies, statuses, lock = [], [], threading.Lock()

    def client_loop(index: int):
        session = requests.Session()
        headers = {'Authorization': f'Bearer {keys[index % len(keys)]}'}
        for _ in range(10):
            started = time.perf_counter()
            response = session.post(f'{server.url}/v1/adapters/tally/forward_backward', json={'inputs': [SAMPLE]},
                                    headers=headers, timeout=120)
            with lock:
                latencies.append(time.perf_counter() - started)
                statuses.append(response.status_code)

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        list(pool.map(client_loop, range(20)))
    elapsed = time.perf_counter() - started
    assert len(statuses) == 200 and set(statuses) == {200}, sorted(set(statuses))
    for key in keys:  # 5 clients x 10 requests x 4 tokens per tenant, none lost
        metric = MultiLoraTransformersModel(client=TwinkleClient(server.url, key)).calculate_metric(adapter_name='tally')
        assert metric['tokens'] == 5 * 10 * 4, (key, metric)
    latencies.sort()
    with capsys.disabled():
        print(f'\nload: 200 forward_backward from 20 clients: p50 {statistics.median(latencies) * 1e3:.0f} ms, '
              f'p99 {latencies[int(0.99 * len(latencies)) - 1] * 1e3:.0f} ms, {200 / elapsed:.1f} requests/s')


def test_a_full_queue_answers_429_and_the_queued_requests_still_finish(tmp_path):
    with RunningServer(make_config(tmp_path, quotas=Quotas(max_queued=2))) as small:
        model = MultiLoraTransformersModel(client=TwinkleClient(small.url, 'key-a'))
        model.add_adapter_to_model('q', {'r': 2, 'lora_alpha': 4}, gradient_accumulation_steps=1024)
        batch = {'inputs': [SAMPLE] * 8}
        gate, busy = threading.Event(), threading.Event()
        small.app.state.service.executor.submit('alice', lambda: (busy.set(), gate.wait(120)))
        assert busy.wait(60)  # the model is busy with a call of alice's: her queue is empty and holds 2

        def post(_):
            return requests.post(f'{small.url}/v1/adapters/q/forward_backward', json=batch, timeout=120,
                                 headers={'Authorization': 'Bearer key-a'}).status_code
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(post, index) for index in range(12)]
            deadline = time.monotonic() + 60
            while sum(future.done() for future in futures) < 10 and time.monotonic() < deadline:
                time.sleep(0.05)  # the 10 that find the queue full are answered while the model is busy
            gate.set()
            statuses = [future.result(timeout=120) for future in futures]
        assert statuses.count(429) == 10 and statuses.count(200) == 2, statuses  # max_queued=2 wait, the rest 429
        metric = model.calculate_metric(adapter_name='q')
        assert metric['tokens'] == 2 * 8 * 4  # the two accepted requests ran, once each
