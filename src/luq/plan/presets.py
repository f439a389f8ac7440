"""llama.cpp's presets for a model, as `llama-quantize` would make them: the file a user would otherwise run.

`llama-quantize MODEL OUT Q4_K_M` gives every tensor a type by fixed rules: the preset's base type, a few
tensors bumped (the output head to Q6_K, attn_v and ffn_down on some layers: `use_more_bits`), and a type
whose block does not divide a tensor's rows replaced by a fixed fallback (Q4_K -> Q5_0, ...). Written here
from reading llama.cpp's `llama_tensor_get_type_impl` and `tensor_type_fallback` (llama-quant.cpp of the
pinned release 11434), for dense decoders (no experts, not Falcon, not 70B) and the presets whose every
type is one of luq's ggml formats. `--speed-of auto` holds a plan to the predicted decode speed of the
largest of these that fits the budget. `tests/test_llamacpp.py` checks the rules tensor by tensor against
llama-quantize itself on SmolLM2, `tests/test_presets.py` against the presets bench.gguf recorded.

A linear's role comes from its module name (the Hugging Face names every supported family uses); a model
with a linear of no known role has no presets here (None).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from luq.plan.sizes import Plan, SizeTable

ROLES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
         "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
         "embed_tokens": "token_embd", "lm_head": "output"}

# preset -> its base type (llama.cpp's default_type of the ftype)
BASE_TYPE = {"Q8_0": "q8_0", "Q6_K": "q6_k", "Q5_K_M": "q5_k", "Q5_K_S": "q5_k", "Q5_1": "q5_1", "Q5_0": "q5_0",
             "Q4_K_M": "q4_k", "Q4_K_S": "q4_k", "Q4_1": "q4_1", "Q4_0": "q4_0", "IQ4_NL": "iq4_nl",
             "Q3_K_L": "q3_k", "Q3_K_M": "q3_k", "Q3_K_S": "q3_k", "Q2_K": "q2_k"}

# a 256-weight type whose block does not divide a tensor's rows -> llama.cpp's 32-weight stand-in
FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


@dataclass(frozen=True)
class Role:
    """Where llama.cpp's rules see a linear: its tensor kind (token_embd, output, attn_q, ..., ffn_down)
    and its decoder layer (None outside)."""

    kind: str
    layer: int | None


def role(name: str) -> Role | None:
    """The role of a linear from its module name ('model.layers.3.self_attn.v_proj' -> attn_v, layer 3)."""
    kind = ROLES.get(name.rsplit(".", 1)[-1])
    if kind is None:
        return None
    layer = re.search(r"\.layers\.(\d+)\.", name)
    return Role(kind, int(layer.group(1)) if layer else None)


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def preset_type(preset: str, kind: str, layer: int | None, n_layers: int, gqa: int, tied: bool,
                fits: set[str], imatrix: bool = True) -> str:
    """The ggml type llama-quantize gives one tensor in `preset` (`fits`: the types its rows allow)."""
    base = t = BASE_TYPE[preset]
    i, n = layer, n_layers
    if kind == "output" or (tied and kind == "token_embd"):
        t = "q8_0" if base not in fits else ("q6_k" if base != "q8_0" else t)
    elif kind == "attn_v":
        if preset == "Q2_K":
            t = "q4_k" if gqa >= 4 else "q3_k"
        elif preset == "Q3_K_M":
            t = "q5_k" if i < 2 else "q4_k"
        elif preset == "Q3_K_L":
            t = "q5_k"
        elif preset == "IQ4_NL" and gqa >= 4:
            t = "q5_k"
        elif preset in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
            t = "q6_k"
        elif preset == "Q4_K_S" and i < 4:
            t = "q5_k"
    elif kind == "ffn_down":
        if preset == "Q2_K":
            t = "q3_k"
        elif preset == "Q3_K_M":
            t = "q5_k" if i < n // 16 else "q4_k"
        elif preset == "Q3_K_L":
            t = "q5_k"
        elif preset == "Q4_K_M":
            t = "q6_k" if use_more_bits(i, n) else t
        elif preset == "IQ4_NL" and i < n // 8 and not imatrix:
            t = "q5_k"
        elif preset == "Q5_K_M" and use_more_bits(i, n):
            t = "q6_k"
        elif preset == "Q4_K_S" and i < n // 8:
            t = "q5_k"
        elif preset in ("Q4_0", "Q5_0") and imatrix and i < n // 8:
            t = "q4_1" if preset == "Q4_0" else "q5_1"
    elif kind == "attn_output":
        t = {"Q2_K": "q3_k", "Q3_K_M": "q4_k", "Q3_K_L": "q5_k"}.get(preset, t)
    if t not in fits:
        t = FALLBACK.get(t, t)
    return t


def preset_plans(sizes: SizeTable, imatrix: bool = True) -> dict[str, Plan] | None:
    """Each preset's plan over the planned linears (llama.cpp type names, which are luq's ggml format
    names); a preset that needs a format the menu lacks is left out. None where a linear has no known
    role or the model has no decoder attention (the rules need attn_q and attn_v)."""
    roles = {name: role(name) for name in sizes.linears}
    if any(r is None for r in roles.values()):
        return None
    layers = [r.layer for r in roles.values() if r.layer is not None]
    q = [sizes.linears[n].n_weights for n, r in roles.items() if r.kind == "attn_q"]
    v = [sizes.linears[n].n_weights for n, r in roles.items() if r.kind == "attn_v"]
    if not layers or not q or not v:
        return None
    n_layers, gqa = max(layers) + 1, q[0] // v[0]   # heads per kv head: q's rows over v's
    tied = not any(r.kind == "output" for r in roles.values())
    # the types a tensor's rows allow: those it has a size in, and (unknown here) every type the menu lacks
    lacking = set(FALLBACK) | set(FALLBACK.values()) | set(BASE_TYPE.values())
    lacking -= {f for s in sizes.linears.values() for f in s.bytes}
    plans = {}
    for preset in BASE_TYPE:
        plan = {name: preset_type(preset, r.kind, r.layer, n_layers, gqa, tied,
                                  set(sizes.linears[name].bytes) | lacking, imatrix)
                for name, r in roles.items()}
        if all(fmt in sizes.linears[name].bytes for name, fmt in plan.items()):
            plans[preset] = plan
    return plans
