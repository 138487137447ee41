"""Four tenants' workloads, written once, run concurrently or alone by the tests."""
from peft import LoraConfig
from safetensors.torch import load_file

from twinkle_client import ServiceError, TwinkleClient
from twinkle_client.model import MultiLoraTransformersModel
from twinkle_client.sampler import vLLMSampler


def alice(client: TwinkleClient, features):
    """SFT at r=8 with AdamW; sends bad requests on the way (they must not disturb anyone)."""
    model = MultiLoraTransformersModel(client=client)
    model.add_adapter_to_model('default', LoraConfig(target_modules='all-linear', r=8, lora_alpha=16, lora_dropout=0.1))
    model.set_optimizer('AdamW', lr=1e-3)
    losses = []
    for step in range(3):
        losses.append(model.forward_backward(inputs=features[4 * step:4 * step + 4])['loss'])
        model.clip_grad_and_step()
        _expect_error(lambda: model.forward_backward(inputs=[{'input_ids': [10**9]}]), 400)
        _expect_error(lambda: model.set_loss('NoSuchLoss'), 400)
    return {'losses': losses, 'path': model.save(name='final', save_optimizer=True)}


def bob(client: TwinkleClient, features):
    """SFT at r=32 with SGD and gradient accumulation 2."""
    model = MultiLoraTransformersModel(client=client)
    model.add_adapter_to_model('default', LoraConfig(target_modules=['q_proj', 'v_proj'], r=32, lora_alpha=32, lora_dropout=0.05),
                               gradient_accumulation_steps=2)
    model.set_optimizer('SGD', lr=5e-2, momentum=0.9)
    losses = []
    for step in range(4):
        losses.append(model.forward_backward(inputs=features[2 * step:2 * step + 2])['loss'])
        model.clip_grad_and_step()
    return {'losses': losses, 'path': model.save(name='final')}


def carol(client: TwinkleClient, features):
    """GRPO: sample with the saved adapter, train on the samples."""
    model = MultiLoraTransformersModel(client=client)
    model.add_adapter_to_model('policy', LoraConfig(target_modules='all-linear', r=8, lora_alpha=32))
    model.set_loss('GRPOLoss', epsilon=0.2)
    model.set_optimizer('AdamW', lr=1e-2)
    uri = model.save(name='policy-0')
    prompts = [{'input_ids': feature['input_ids'][:12]} for feature in features[:2]]
    response = vLLMSampler(client=client).sample(inputs=prompts, adapter_uri=uri, num_samples=2,
                                                 sampling_params={'max_tokens': 4, 'logprobs': 1, 'seed': 3})
    sequences = response.sequences
    result = model.forward_backward(inputs=[seq.new_input_feature for seq in sequences],
                                    old_logps=[seq.logprobs for seq in sequences], advantages=[1.0, -1.0, 0.5, -0.5])
    model.clip_grad_and_step()
    return {'losses': [result['loss']], 'tokens': [seq.tokens for seq in sequences], 'path': model.save(name='final')}


def dave(client: TwinkleClient, features):
    """Inference only: log-probs under a fresh adapter."""
    model = MultiLoraTransformersModel(client=client)
    model.add_adapter_to_model('scorer', LoraConfig(target_modules='all-linear', r=4, lora_alpha=8))
    return {'logprobs': model.compute_logprobs(features[:3])}


JOBS = {'key-a': alice, 'key-b': bob, 'key-c': carol, 'key-d': dave}


def adapter_tensors(checkpoint_dir, path: str):
    """The safetensors a ``twinkle://tenant/name`` checkpoint holds."""
    import os
    tenant, name = path[len('twinkle://'):].split('/')
    root = os.path.join(checkpoint_dir, tenant, name)
    internal = open(os.path.join(root, 'twinkle_adapter.txt')).read().strip()
    return load_file(os.path.join(root, internal, 'adapter_model.safetensors'))


def _expect_error(call, status: int) -> None:
    try:
        call()
    except ServiceError as error:
        assert error.status == status, error
        return
    raise AssertionError(f'expected HTTP {status}')
