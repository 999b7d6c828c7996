from ember.models.llama import LlamaModel

MODEL_FAMILIES = {"llama": LlamaModel, "mistral": LlamaModel, "qwen2": LlamaModel, "qwen3": LlamaModel,
                  "qwen2moe": LlamaModel, "qwen3moe": LlamaModel, "mixtral": LlamaModel}

__all__ = ["LlamaModel", "MODEL_FAMILIES"]
