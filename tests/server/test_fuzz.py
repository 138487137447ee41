"""Fuzz: schemathesis generates requests from the service's own OpenAPI schema; none may get a 5xx."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

schemathesis = pytest.importorskip('schemathesis', reason='fuzzing needs schemathesis (the dev extra)')

from twinkle_client import TwinkleClient  # noqa: E402
from twinkle_client.model import MultiLoraTransformersModel  # noqa: E402

EXAMPLES_PER_OPERATION = 45  # x 14 operations x 2 modes (valid, invalid): over 1,000 generated requests
counted = {}  # generation mode -> {status: requests}


@pytest.mark.slow
def test_generated_requests_never_get_a_server_error(server):
    model = MultiLoraTransformersModel(client=TwinkleClient(server.url, 'key-g'))
    model.add_adapter_to_model('a', {'r': 2, 'lora_alpha': 4})  # a name the generator may hit, beside random ones
    schema = schemathesis.openapi.from_asgi('/openapi.json', server.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14, [op.label for op in operations]
    failures = []
    for operation, mode in [(op, mode) for op in operations
                            for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)]:
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case):
            if mode == schemathesis.GenerationMode.POSITIVE:  # valid requests carry a valid key
                case.headers = {key: value for key, value in (case.headers or {}).items()
                                if key.lower() not in ('authorization', 'x-api-key')}
                case.headers['Authorization'] = 'Bearer key-g'  # the fuzzer's own tenant
            response = case.call()
            by_status = counted.setdefault(str(mode), {})
            by_status[response.status_code] = by_status.get(response.status_code, 0) + 1
            if response.status_code >= 500:
                failures.append((operation.label, case.as_curl_command(), response.text[:300]))
        try:
            check()
        except Unsatisfiable:  # an operation without parameters has no invalid request to generate
            assert mode == schemathesis.GenerationMode.NEGATIVE, operation.label
    total = sum(sum(by_status.values()) for by_status in counted.values())
    print(f'fuzz: {total} requests, by generation mode and status: {counted}')
    assert not failures, failures[:3]
    assert total >= 1000 and counted['positive'].get(200, 0) > 100  # many valid requests reached the model
