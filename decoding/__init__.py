"""Gorgon's offline decoding API.

The names below load on first use, so that importing a torch-free part of the package (the grammar
compile workers) does not pay for torch and the engine.
"""

from __future__ import annotations

from importlib import import_module

_EXPORTS = {"CompletionOutput": "decoding.outputs", "Engine": "decoding.engine", "EngineConfig": "decoding.config",
            "RequestOutput": "decoding.outputs", "SamplingParams": "decoding.params",
            "TokenLogprob": "decoding.sequence"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'decoding' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
