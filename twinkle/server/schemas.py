"""The request bodies of the /v1 API: typed, bounded, and strict (an unknown field is a 422 naming it)."""
from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from .auth import NAME_PATTERN
from .service import SETTERS, STEPS

Name = Field(pattern=NAME_PATTERN, description='1-64 letters, digits, "_" or "-"')
MAX_SAMPLES = 1024
MAX_TOKENS = 32768
JSONScalar = Union[str, int, float, bool, None]
Arguments = Dict[str, Union[JSONScalar, List[JSONScalar]]]


class Strict(BaseModel):
    model_config = ConfigDict(extra='forbid')


class Feature(BaseModel):
    """An encoded sample (an ``InputFeature``): token ids, and labels (-100: not trained) of the same length."""
    model_config = ConfigDict(extra='allow')
    input_ids: List[int] = Field(min_length=1, max_length=MAX_TOKENS)
    labels: Optional[List[int]] = Field(None, max_length=MAX_TOKENS)
    attention_mask: Optional[List[int]] = Field(None, max_length=MAX_TOKENS)
    position_ids: Optional[List[int]] = Field(None, max_length=MAX_TOKENS)


class LoraSpec(Strict):
    r: int = Field(8, ge=1, le=1024)
    lora_alpha: float = Field(16, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: Union[Literal['all-linear'], List[str]] = 'all-linear'


class AddAdapter(Strict):
    name: str = Name
    lora: LoraSpec = Field(default_factory=LoraSpec)
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    seed: Optional[int] = Field(None, ge=0, lt=2**63)


class Configure(Strict):
    setter: Literal[SETTERS]
    value: str = Field(min_length=1, max_length=128, description='a class name, e.g. "AdamW", "GRPOLoss"')
    kwargs: Arguments = Field(default_factory=dict)


class ForwardBackward(Strict):
    inputs: List[Feature] = Field(min_length=1, max_length=MAX_SAMPLES)
    micro_batch_size: Optional[int] = Field(None, ge=1, le=MAX_SAMPLES)
    old_logps: Optional[List[List[float]]] = Field(None, max_length=MAX_SAMPLES)
    advantages: Optional[List[float]] = Field(None, max_length=MAX_SAMPLES)
    ref_logps: Optional[List[List[float]]] = Field(None, max_length=MAX_SAMPLES)


class Inputs(Strict):
    inputs: List[Feature] = Field(min_length=1, max_length=MAX_SAMPLES)


class StepCall(Strict):
    method: Literal[STEPS]
    kwargs: Arguments = Field(default_factory=dict)


class Save(Strict):
    name: str = Name
    save_optimizer: bool = False


class Push(Strict):
    hub_model_id: str = Field(pattern=r'^(ms|hf)://[A-Za-z0-9_.-]{1,96}/[A-Za-z0-9_.-]{1,96}$',
                              description='ms://org/name or hf://org/name')
    private: bool = True


class Load(Strict):
    path: str = Field(max_length=256, description='a twinkle:// path from save()')
    load_optimizer: bool = False


class SamplingSpec(Strict):
    max_tokens: int = Field(64, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0, le=100)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=1)
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = Field(None, ge=0, lt=2**63)


class Sample(Strict):
    inputs: List[Union[Feature, Dict[str, Any]]] = Field(min_length=1, max_length=MAX_SAMPLES,
                                                        description='encoded features, or trajectories (messages)')
    sampling_params: SamplingSpec = Field(default_factory=SamplingSpec)
    adapter_uri: Optional[str] = Field(None, max_length=256)
    num_samples: int = Field(1, ge=1, le=64)
