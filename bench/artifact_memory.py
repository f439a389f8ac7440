"""Memory of a loaded luq artifact: resident size after load and one forward (RSS minus
the baseline of a process that has imported everything and loaded the tokenizer; it also counts
what the forward leaves behind: allocator caches, library workspaces) and the bytes of the tensors
the model then holds (parameters, buffers and the QuantLinear kernels), and on-disk size, each against
the report's `total_bytes`; the full-precision model loaded the same way for comparison; then the
quantized linears by method, bits per weight stored and held.

    python -m bench.artifact_memory out/demo [--base smollm2]

Each measurement runs in a fresh process; prints a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

PROBE = r"""
import ctypes, gc, json, sys, torch
import accelerate, safetensors.torch, transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer
import luq
from luq.models.loading import load_model, resolve
libc = ctypes.CDLL("libc.so.6")
def rss():  # resident bytes after returning freed heap to the OS
    gc.collect(); libc.malloc_trim(0)
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
what, arg, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
source = arg if what == "artifact" else resolve(arg)
# the baseline holds everything but the weights: modules imported, model code, tokenizer loaded
config = AutoConfig.from_pretrained(source)
transformers.models.auto.modeling_auto  # noqa
with accelerate.init_empty_weights():
    AutoModelForCausalLM.from_config(config) if not hasattr(config, "vision_config") else None
tokenizer = AutoTokenizer.from_pretrained(source)
base = rss()
if what == "artifact":
    model = luq.load(arg, dtype=dtype, verify=False)[0]
else:
    model = load_model(arg, "cpu", dtype)[0]
with torch.no_grad():  # touch every weight: memory-mapped pages count once they are read
    model(input_ids=torch.tensor([[1, 2, 3, 4]]))
delta = rss() - base
storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in list(model.parameters()) + list(model.buffers())}   # tied tensors once
linears = [m for m in model.modules() if isinstance(m, luq.quant.QuantLinear)]
kernels = sum(m.kernel.nbytes for m in linears)
by_method = {}   # quantized linears by method: weights, stored bytes, bytes held (stored tensors kept + kernel)
for m in linears:
    bias = 0 if m.bias is None else m.bias.numel() * m.bias.element_size()
    row = by_method.setdefault(m.weight_config["method"], [0, 0, 0])
    row[0] += m.in_features * m.out_features; row[1] += m.nbytes; row[2] += m.resident_nbytes - bias
print(json.dumps({"rss_delta": delta, "tensors": sum(storages.values()) + kernels, "by_method": by_method}))
"""


def probe(what: str, arg: str, dtype: str) -> tuple[int, int, dict]:
    """(RSS over the baseline, bytes of the tensors the model holds: parameters, buffers, kernels; the
    quantized linears by method: [weights, stored bytes, bytes held])."""
    out = subprocess.run([sys.executable, "-c", PROBE, what, arg, dtype], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["rss_delta"], result["tensors"], result["by_method"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", type=Path)
    p.add_argument("--base", default=None, help="the unquantized model to compare with (default: the report's)")
    args = p.parse_args(argv)
    report = json.loads((args.artifact / "luq_report.json").read_text())
    total = report["total_bytes"]
    disk = sum(f.stat().st_size for f in args.artifact.glob("*.safetensors"))
    rows = [("artifact on disk (safetensors files)", (disk, None, {})),
            ("artifact loaded, float16 unquantized tensors", probe("artifact", str(args.artifact), "float16")),
            ("artifact loaded, float32 unquantized tensors", probe("artifact", str(args.artifact), "float32"))]
    base = args.base or report["model"]
    rows += [(f"{base} unquantized, float16", probe("model", base, "float16")),
             (f"{base} unquantized, float32", probe("model", base, "float32"))]
    low = report.get("n_low_layers", report.get("k"))   # an entropy allocation's (older luq: "k")
    print(f"report total_bytes = {total:,} ({'' if low is None else f'{low} layers at low bit, '}"
          f"{report['avg_bits']:.3f} true bits)\n")
    print("| what | bytes (RSS over baseline) | / total_bytes | tensors held | / total_bytes |\n|---|---:|---:|---:|---:|")
    for name, (value, held, _) in rows:
        tail = "| |" if held is None else f"| {held:,} | {held / total:.3f} |"
        print(f"| {name} | {value:,} | {value / total:.3f} {tail}")
    print("\nquantized linears after one forward (float16 load), by method: bits per weight stored and held "
          "(the stored tensors they keep and their kernels')\n")
    print("| method | weights | stored bits | held bits | held / stored |\n|---|---:|---:|---:|---:|")
    for method, (weights, stored, held) in rows[1][1][2].items():
        print(f"| {method} | {weights:,} | {8 * stored / weights:.3f} | {8 * held / weights:.3f} | {held / stored:.3f} |")


if __name__ == "__main__":
    main()
