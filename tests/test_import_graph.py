"""The import graph. The core never imports a device library (torch.cuda, triton, jax, IPEX), and
it runs a model without torch when its backend brings its own runner: importing the engine,
the sampler, structured output, the GGUF loader, the CLI and the offline API must not import it
(`import torch` alone costs over a second before the first token)."""
import ast
import subprocess
import sys
from pathlib import Path

TORCH_FREE = ["ember.engine.llm_engine", "ember.sampler", "ember.structured", "ember.gguf.loader",
              "ember.engine.model_runner", "ember.cli", "ember.llm", "ember.loading", "ember.hf.loader",
              "ember.quant.builtin", "ember.plugins.manager", "ember.models.registry"]


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


# The core is hardware-neutral: device libraries belong to the backend plugins.
DEVICE_LIBRARIES = ("torch.cuda", "triton", "jax", "jaxlib", "intel_extension_for_pytorch", "torch_xla")
CORE = Path(__file__).resolve().parent.parent / "core"


def _device_imports(source: str, filename: str) -> list[str]:
    """Every import statement in the source that names a device library (or a submodule of one),
    anywhere in the file: inside functions and under TYPE_CHECKING too."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found += [f"{filename}:{node.lineno}: {n}" for n in names
                  if any(n == lib or n.startswith(lib + ".") for lib in DEVICE_LIBRARIES)]
    return found


def test_core_never_imports_a_device_library():
    files = sorted(CORE.rglob("*.py"))
    assert len(files) > 30
    found = [hit for f in files for hit in _device_imports(f.read_text(), str(f.relative_to(CORE.parent)))]
    assert not found, "device libraries imported in core:\n" + "\n".join(found)


def test_the_device_import_scan_can_fail():
    src = "import os\nfrom torch import cuda\ndef f():\n    import triton.language as tl\nimport jax.numpy\n"
    assert sorted(h.split(": ")[1] for h in _device_imports(src, "x.py")) == ["jax.numpy", "torch.cuda", "triton.language"]


def test_importing_every_core_module_loads_no_device_library():
    modules = sorted({"ember." + ".".join(f.relative_to(CORE).with_suffix("").parts).removesuffix(".__init__")
                      for f in CORE.rglob("*.py")} - {"ember.__main__"})
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {{'triton', 'jax', 'jaxlib', "
            f"'intel_extension_for_pytorch', 'torch_xla'}}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


PLUGINS = Path(__file__).resolve().parent.parent / "plugins"


def test_plugins_take_the_runner_contract_from_ember_backend():
    """The step types a runner consumes belong to the versioned contract (ember.backend): a plugin
    that imports ember.engine.* depends on the core's insides."""
    found = []
    for f in sorted(PLUGINS.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            found += [f"{f.relative_to(PLUGINS.parent)}:{node.lineno}: {n}" for n in names
                      if n == "ember.engine" or n.startswith("ember.engine.")]
    assert not found, "plugins importing ember.engine:\n" + "\n".join(found)
    import ember.backend as contract

    for name in contract.RUNNER_API:
        assert getattr(contract, name) is not None
