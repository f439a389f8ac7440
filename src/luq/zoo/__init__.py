"""The zoo: the built-in demo and test models and data, all offline. luq's core never imports it (a built-in
name reaches it as a "module:function" string, see `luq.models.loading.BUILTIN`).

smollm2.py: SmolLM2-135M-Instruct from its GGUF, the Wikipedia text, real GPTQ problems; dinov2.py:
DINOv2-small; tinyvlm.py: the small real VLM built from both; offgrid.py: SmolLM2 moved off its Q4_1 grid."""
