"""Quantize /work/models/hf/smollm2-bf16 with one tool (argv[1]): llmcompressor | gptqmodel | autoround."""
import contextlib, json, os, shutil, sys, tempfile, time
from pathlib import Path
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
import torch
torch.set_num_threads(2)
sys.path.insert(0, "/work/main/tests/fixtures/quantized")
from make_fixtures import CALIBRATION  # 36 English sentences
BASE = Path("/work/models/hf/smollm2-bf16")
tool = sys.argv[1]
t0 = time.time()
if tool == "llmcompressor":
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer
    OUT = Path("/work/models/hf/smollm2-ct-w4a16-g64")
    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(BASE)
    weights = PRESET_SCHEMES["W4A16"]["weights"].model_copy(update=dict(group_size=64))
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    oneshot(model=model, recipe=QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    shutil.rmtree(OUT, ignore_errors=True)
    model.save_pretrained(OUT, save_compressed=True)
    tok.save_pretrained(OUT)
elif tool == "gptqmodel":
    from gptqmodel import GPTQModel, QuantizeConfig
    OUT = Path("/work/models/hf/smollm2-gptq-w4g64")
    shutil.rmtree(OUT, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        qcfg = QuantizeConfig(bits=4, group_size=64, desc_act=False, sym=True)
        m = GPTQModel.load(str(BASE), qcfg)
        m.quantize(CALIBRATION, batch_size=1)
        m.save(str(OUT))
elif tool == "autoround":
    from auto_round import AutoRound
    OUT = Path("/work/models/hf/smollm2-awq-w4g64")
    fmt = sys.argv[2] if len(sys.argv) > 2 else "auto_awq"
    sym = fmt != "auto_awq"
    if fmt != "auto_awq":
        OUT = Path("/work/models/hf/smollm2-gptq-w4g64")
    ar = AutoRound(str(BASE), bits=4, group_size=64, sym=sym, iters=0,
                   dataset=CALIBRATION, nsamples=len(CALIBRATION), seqlen=32)
    shutil.rmtree(OUT, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        ar.quantize_and_save(tmp, format=fmt)
        (written,) = {p.parent for p in Path(tmp).rglob("config.json")}
        shutil.copytree(written, OUT)
for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]:
    if not (OUT / f).exists():
        shutil.copy(BASE / f, OUT / f); print("copied", f, "from the bf16 directory")
qc = json.loads((OUT / "config.json").read_text())["quantization_config"]
print("QC", json.dumps({k: v for k, v in qc.items() if k != "meta"}))
print(f"TIME {tool}: {time.time() - t0:.0f} s")
