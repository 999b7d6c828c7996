"""The torch model of the llama family, and the registry of the architectures it runs."""
from ember.models.registry import ARCHITECTURES, HF_MODEL_TYPES, architecture, model_class

__all__ = ["ARCHITECTURES", "HF_MODEL_TYPES", "architecture", "model_class"]
