"""Refusals decided before any work: everything about a run that can be known from the config, the
paths and the loaded model skeleton is checked here, so that a run never fails after the long
variant pass on something it could have said at the start (one `LuqError` line each).

`check_run` is called by `luq.quantize` right after the model is loaded (its layers may still be
in their shards); the output checks are shared with `luq entropy` and `luq eval`, and the device
is checked where every model is loaded (`luq.models.loading.check_device`).
"""

from __future__ import annotations

import os
from pathlib import Path

from luq.config import LUQConfig
from luq.errors import LuqError


def check_out_dir(out: Path) -> None:
    """An --out directory that can be created (or is one) and written into."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LuqError(f"--out {out} exists and is not a directory")
    _check_writable_parent(out)


def check_out_file(out: Path) -> None:
    """An --out file that can be written (its folder exists or can be made; it is not a directory)."""
    out = Path(out)
    if out.is_dir():
        raise LuqError(f"--out {out} is a directory; give a file name")
    _check_writable_parent(out)


def _check_writable_parent(out: Path) -> None:
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise LuqError(f"--out {out}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise LuqError(f"--out {out}: {parent} is not writable")
            return


def check_run(config: LUQConfig, n_layers: int, processor, adapter, sensitivity: bool) -> None:
    """Every refusal of `config` on this model that needs no quantization: the rule's layer count and
    order against the model's layers, the --max-drop metric against the model kind and its data, and
    the held-out text windows the metric and (where the run reads them: `sensitivity`) the sensitivity
    need."""
    if config.allocate == "entropy":
        if config.entropy.n_low_layers is not None and config.entropy.n_low_layers > n_layers:
            raise LuqError(f"--n-low-layers {config.entropy.n_low_layers} asked for, but the model has {n_layers} decoder "
                           "layers")
        if not isinstance(config.entropy.order, str):
            bad = [i for i in config.entropy.order if not 0 <= int(i) < n_layers]
            if bad:
                raise LuqError(f"--order names layer(s) {bad}, but the model has layers 0..{n_layers - 1}")
            if config.entropy.n_low_layers is not None and config.entropy.n_low_layers > len(config.entropy.order):
                raise LuqError(f"--n-low-layers {config.entropy.n_low_layers} asked for, but --order lists "
                               f"{len(config.entropy.order)} layers")
    if config.max_drop is not None:
        _check_metric(config, processor)
    if sensitivity:
        from luq.calibration import sensitivity_batches

        sensitivity_batches(processor, adapter, config.calibration, config.measured.sensitivity_samples,
                            config.validation_samples)   # raises where the text is too short for them


def _check_metric(config: LUQConfig, processor) -> None:
    """The metric --max-drop watches: known, fit for this model, its data readable, its windows there."""
    from luq.eval.datasets import known_tasks

    metric = config.metric
    if metric == "perplexity":
        from luq.calibration import text_token_ids, validation_windows

        cal = config.calibration
        validation_windows(text_token_ids(processor, cal.text), config.validation_samples, cal.seq_len, cal.seed,
                           cal.n_text)
        return
    if metric not in known_tasks():
        raise LuqError(f"unknown metric {metric!r}; known: perplexity, {', '.join(known_tasks())}")
    if not hasattr(processor, "image_processor"):
        raise LuqError(f"--metric {metric} needs a vision-language model; use --metric perplexity")
    from luq.eval.datasets import load_samples

    load_samples(metric, config.metric_data)   # a missing or malformed --metric-data fails here
