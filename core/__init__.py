"""ember: LLM inference on any hardware, through backend plugins."""
from ember.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name):
    # LLM pulls in the engine; keep `import ember` light for the CLI and plugins
    if name == "LLM":
        from ember.llm import LLM

        return LLM
    raise AttributeError(name)
