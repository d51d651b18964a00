"""Gorgon's offline decoding API."""

from decoding.config import EngineConfig
from decoding.engine import Engine
from decoding.outputs import CompletionOutput, RequestOutput
from decoding.params import SamplingParams
from decoding.sequence import TokenLogprob

__all__ = ["CompletionOutput", "Engine", "EngineConfig", "RequestOutput", "SamplingParams", "TokenLogprob"]
