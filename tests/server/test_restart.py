"""A restarted service keeps its checkpoints, and a tenant resumes exactly where it saved."""
import pytest

from twinkle_client import TwinkleClient
from twinkle_client.model import MultiLoraTransformersModel

from .conftest import RunningServer, make_config

BATCHES = [[{'input_ids': [5, 6, 7, 8, 9 + step, 11], 'labels': [5, 6, 7, 8, 9 + step, 11]}] * 2 for step in range(4)]


def train(model, batches):
    losses = []
    for batch in batches:
        losses.append(model.forward_backward(inputs=batch)['loss'])
        model.clip_grad_and_step()
    return losses


def new_model(server, key='key-a'):
    model = MultiLoraTransformersModel(client=TwinkleClient(server.url, key))
    model.add_adapter_to_model('run', {'r': 4, 'lora_alpha': 8})
    model.set_optimizer('AdamW', lr=1e-2)
    return model


@pytest.mark.slow
def test_checkpoints_survive_a_restart_and_resume_continues_the_same_run(server, tmp_path):
    straight = train(new_model(server, 'key-d'), BATCHES)  # the uninterrupted run, on the shared service
    config = make_config(tmp_path / 'restarted')
    with RunningServer(config) as first_life:
        model = new_model(first_life)
        first = train(model, BATCHES[:2])
        path = model.save(name='half', save_optimizer=True)
    with RunningServer(config.model_copy(update={'port': make_config(tmp_path).port})) as second_life:
        client = TwinkleClient(second_life.url, 'key-a')
        assert [entry['path'] for entry in client.list_checkpoints()] == [path]
        model = new_model(second_life)
        model.resume_from_checkpoint(path)
        second = train(model, BATCHES[2:])
    assert first + second == straight  # bit for bit: the same computations on the same state
