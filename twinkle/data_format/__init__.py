"""The data formats of the RL half: what a sampler is asked (``SamplingParams``) and answers
(``SampleResponse``), beside the pipeline's ``Trajectory`` and ``InputFeature``."""
from twinkle.template.features import InputFeature, Message, Trajectory

from .sampling import SampledSequence, SampleResponse, SamplingParams

__all__ = ['InputFeature', 'Message', 'SampleResponse', 'SampledSequence', 'SamplingParams', 'Trajectory']
