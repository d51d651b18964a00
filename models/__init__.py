"""Model loading and native paged-cache implementations of HF architectures."""

from models.loader import SUPPORTED_MODEL_TYPES, LoadedModel, ModelLoadError, load_model

__all__ = ["SUPPORTED_MODEL_TYPES", "LoadedModel", "ModelLoadError", "load_model"]
