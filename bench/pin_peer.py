"""Pin the peer GPTQ's errors on the real SmolLM2 test layers, for tests/test_solvers_real.py.

    make venv && .venv/bin/python -m pip install --no-deps llmcompressor==0.14.0.1 compressed-tensors==0.19.0 \
        datasets loguru && .venv/bin/python bench/pin_peer.py

The CI venv has no llmcompressor (its transformers pin would downgrade ours), so the
test compares luq against these measured figures. SmolLM2's 576 input columns are not a
multiple of 128; bench/peer.py pads them for llmcompressor (a narrower last group).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.peer import peer_gptq  # noqa: E402
from luq.zoo.smollm2 import smollm2_linear_problems  # noqa: E402
from luq.quant import relative_output_error  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "peer_gptq_smollm2.json"
SETTINGS = dict(bits=4, group_size=128, act_order=True, sym=False, block_size=128, damp=0.01)


def main():
    errors = {}
    for p in smollm2_linear_problems():
        errors[p.name] = relative_output_error(p.weight, peer_gptq(p.weight, p.hessian, **SETTINGS), p.hessian)
        print(f"{p.name:28s} {errors[p.name]:.4e}")
    OUT.write_text(json.dumps({
        "peer": "llmcompressor 0.14.0.1 quantize_weight (actorder=static, memoryless min-max grids)",
        "problems": "luq.zoo.smollm2.smollm2_linear_problems() defaults: layers 0, 15, 29; 16 x 256 Wikipedia tokens",
        "command": "python bench/pin_peer.py",
        "settings": SETTINGS,
        "relative_output_error": errors,
    }, indent=1) + "\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
