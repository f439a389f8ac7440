"""`luq.quantize`: a whole run, from a model to a written artifact, in one call.

    report = luq.quantize("smollm2", "out/q", luq.LUQConfig(budget_gb=0.075))
    report = luq.quantize(model, "out/q", luq.LUQConfig(formats=("gptq4-g128",)), tokenizer=tok)

The steps (checks and calibration, the variant pass, the plan, the final pass, the artifact) are
`luq.Session`'s; this runs them in order.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from luq.checks import check_out_dir
from luq.config import LUQConfig
from luq.session import Session


def quantize(model: str | nn.Module | None, out: Path | str, config: LUQConfig, *, tokenizer=None,
             device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32,
             cache_dir: Path | str | None = None, progress: bool = True, log: Callable[[str], None] = print,
             stream: bool | None = None, on_stage: Callable[[str, float], None] | None = None) -> dict:
    """Quantize `model` (a hub id, a local directory, a built-in name, None for the offline default, or
    an nn.Module with its `tokenizer` or processor) under `config` and write the artifact to `out`;
    returns the report (luq_report.json). Keyword arguments: see `luq.Session`."""
    check_out_dir(Path(out))   # before any work
    session = Session(model, config, tokenizer=tokenizer, device=device, dtype=dtype, cache_dir=cache_dir,
                      progress=progress, log=log, stream=stream, on_stage=on_stage)
    return session.run(out)
