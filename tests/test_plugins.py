"""The plugin contract: discovery through entry points, selection, failures reported not fatal."""
import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from ember.backend import BACKEND_API_VERSION, Availability, Backend
from ember.plugins import BackendUnavailable, PluginRegistry, get_registry, hookimpl

HERE = Path(__file__).parent


def test_in_tree_backend_is_found_through_its_entry_point():
    reg = PluginRegistry()
    info = reg.backends["cpu_gguf"]
    assert info.distribution == "ember" and info.version
    assert info.usable and info.device_type == "cpu"
    assert reg.select("auto").name == "cpu_gguf"
    assert reg.select("cpu").name == "cpu_gguf"


# plugins defined here and handed to the registry as entry points, as a distribution would
class _Broken(Backend):
    name, device_type, priority = "needs_gpu", "cuda", 100

    @classmethod
    def availability(cls):
        return Availability.no("no CUDA device found")

    allocate_kv_cache = attention = create_linear = create_embedding = lambda *a: None


class _Old(_Broken):
    name, api_version = "old", BACKEND_API_VERSION + 1


class unavailable_plugin:  # noqa: N801 - a module-like namespace
    @staticmethod
    @hookimpl
    def ember_register_backends(register):
        register(_Broken)


class old_plugin:  # noqa: N801
    @staticmethod
    @hookimpl
    def ember_register_backends(register):
        register(_Old)


class raising_plugin:  # noqa: N801
    @staticmethod
    @hookimpl
    def ember_register_backends(register):
        raise RuntimeError("boom at registration")


def _eps(*pairs):
    return [EntryPoint(name, value, "ember.backends") for name, value in pairs]


def test_broken_plugins_are_reported_and_do_not_take_others_down():
    eps = list(__import__("importlib.metadata").metadata.entry_points(group="ember.backends")) + _eps(
        ("missing", "ember_no_such_module_xyz"),
        ("unavailable", f"{__name__}:unavailable_plugin"),
        ("old", f"{__name__}:old_plugin"),
        ("raising", f"{__name__}:raising_plugin"),
    )
    reg = PluginRegistry(entry_points=eps)
    by = {b.name: b for b in reg.all()}
    assert by["cpu_gguf"].usable
    assert "failed to load" in by["missing"].availability.reason and "ember_no_such_module_xyz" in by["missing"].error
    assert by["needs_gpu"].availability.reason == "no CUDA device found" and not by["needs_gpu"].usable
    assert "API version" in by["old"].availability.reason
    assert "boom at registration" in by["raising"].availability.reason
    # auto skips what cannot run, even at a higher priority
    assert reg.select("auto").name == "cpu_gguf"
    with pytest.raises(BackendUnavailable, match="no CUDA device found"):
        reg.select("cuda")
    with pytest.raises(BackendUnavailable, match="no backend named 'npu'"):
        reg.select("npu")


def test_no_usable_backend_gives_every_reason():
    reg = PluginRegistry(entry_points=_eps(("unavailable", f"{__name__}:unavailable_plugin")))
    with pytest.raises(BackendUnavailable, match="no CUDA device found"):
        reg.select("auto")


def test_ember_plugins_command_lists_backends():
    out = subprocess.run([sys.executable, "-m", "ember.cli", "plugins", "--json"], capture_output=True,
                         text=True, check=True)
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows["cpu_gguf"]["available"] and rows["cpu_gguf"]["version"]



def test_ember_plugins_verbose_says_which_cpu_kernels_run_and_why(monkeypatch):
    from ember_cpu_gguf import native

    out = subprocess.run([sys.executable, "-m", "ember.cli", "plugins", "--verbose"], capture_output=True,
                         text=True, check=True).stdout
    isa = native.selected()[0]
    assert f"cpu_gguf: {native.machine()} kernels: {isa} (" in out
    capped = subprocess.run([sys.executable, "-m", "ember.cli", "plugins", "--json"], capture_output=True, text=True,
                            check=True, env={**os.environ, "EMBER_MAX_CPU_ISA": "scalar"}).stdout
    details = {r["name"]: r["details"] for r in json.loads(capped)}["cpu_gguf"]
    assert "kernels: scalar" in details and ("EMBER_MAX_CPU_ISA=scalar" in details or isa == "scalar")


@pytest.fixture(scope="module")
def third_party_site(tmp_path_factory):
    """The example distribution under tests/, pip-installed into its own directory."""
    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("src") / "third_party_backend"
    shutil.copytree(HERE / "third_party_backend", source)  # builds leave build/ beside the source
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--target", str(target), str(source)],
                   check=True, capture_output=True)
    return target


def _env(site):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    return env


def test_third_party_backend_is_discovered(third_party_site):
    out = subprocess.run([sys.executable, "-m", "ember.cli", "plugins", "--json"], capture_output=True,
                         text=True, check=True, env=_env(third_party_site))
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows["example"]["distribution"] == "ember-example-backend"
    assert rows["example"]["version"] == "0.3.0" and rows["example"]["available"]
    assert rows["cpu_gguf"]["available"]


@pytest.mark.slow
def test_third_party_backend_runs_the_model(third_party_site, smollm2_gguf):
    """Selected with --device, it generates the same greedy tokens as the in-tree backend."""
    script = f"""
import json, sys
from ember.llm import LLM
from ember.sampling_params import SamplingParams
p = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
res = {{}}
for dev in ("example", "cpu_gguf"):
    # exact: the example backend computes in float32, so cpu_gguf compares with its reference path
    llm = LLM({str(smollm2_gguf)!r}, device=dev, max_model_len=256, exact=True)
    ids = llm.tokenizer.encode_chat([{{"role": "user", "content": "Why is the sky blue?"}}])
    res[dev] = [llm.engine.backend_info.name, llm.generate([ids], p)[0].outputs[0].token_ids]
print(json.dumps(res))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=_env(third_party_site), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["example"][0] == "example"
    assert res["example"][1] == res["cpu_gguf"][1]
