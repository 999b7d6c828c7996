"""The core runs a model without torch when its backend brings its own runner: importing the engine,
the sampler, structured output, the GGUF loader, the CLI and the offline API must not import it
(`import torch` alone costs over a second before the first token)."""
import subprocess
import sys

TORCH_FREE = ["ember.engine.llm_engine", "ember.sampler", "ember.structured", "ember.gguf.loader",
              "ember.engine.model_runner", "ember.cli", "ember.llm"]


def _imports_torch(modules: list[str]) -> bool:
    # A fresh interpreter: this one has imported torch long ago. Plugin discovery is left out on
    # purpose: a plugin may import torch, and that is the plugin's business.
    code = f"import {', '.join(modules)}; import sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip() == "True"


def test_core_modules_do_not_import_torch():
    assert _imports_torch(TORCH_FREE) is False


def test_the_check_can_fail():
    assert _imports_torch(["ember.engine.torch_runner"]) is True
