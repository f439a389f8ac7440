"""Command-line pieces the model benches share: which model, and its calibration."""
from __future__ import annotations

import argparse

from luq.calibration import CalibrationConfig

MODELS = ("smollm2", "smollm2-offgrid", "tiny-vlm", "tiny-vlm-offgrid")
VLMS = ("tiny-vlm", "tiny-vlm-offgrid")


def is_vlm(model: str) -> bool:
    """Whether the bench model is a vision-language model (scored by VQA, calibrated on images + text)."""
    return model in VLMS


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model, --samples, --seq-len, --alpha and --k (the entropy ranking's K-means clusters)."""
    p.add_argument("--model", default="smollm2", choices=MODELS)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--alpha", type=float, default=None,
                   help="multimodal fraction (default 0 text, 0.5 tiny-vlm and tiny-vlm-offgrid)")
    p.add_argument("--k", type=int, default=100, help="K-means clusters of the entropy ranking")


def calibration_of(args: argparse.Namespace) -> CalibrationConfig:
    """The calibration those arguments name: α defaults to 0.5 for a VLM (tiny-vlm, tiny-vlm-offgrid), 0 for text."""
    alpha = args.alpha if args.alpha is not None else (0.5 if is_vlm(args.model) else 0.0)
    return CalibrationConfig(samples=args.samples, seq_len=args.seq_len, alpha=alpha, seed=0)
