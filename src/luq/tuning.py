"""Tuning after quantization: the stored scales and the norms, trained end to end by distillation.

`luq tune ARTIFACT --out DIR` (`luq.tune`): the quantized model learns to match its full-precision
teacher's next-token distributions on calibration text, minimising KL(teacher || student) per token,
with every stored integer code held fixed. What trains:

- the fp16 scale of every (row, group) of a GPTQ-format weight (W_hat = scale * (code - zero)), as
  scale0 * (1 + t) with t starting at zero, so one learning rate moves every scale by the same
  relative step; the embedding and a head tied to it share theirs;
- the fp16 scale d of every block of a weight in a llama.cpp type, the same way; its min field (m or
  dmin of the affine types), like GPTQ's zeros, and the K-quants' integer sub-block scales and mins
  stay with the codes, so a tuned GGUF holds the same types and bytes but for the block scales;
- the norm weights (stored floats; `norm_lr=0` freezes them).

Binarized weights, whose scales are not stored as free floats, are kept as they are. Formats, plan
and bytes are unchanged: the result is an artifact like its source, with a `tuning` section in its
report. This is the end-to-end step of EfficientQAT (Chen et al. 2024, "E2E-QP": codes frozen, step
sizes trained), with the teacher's distribution as the target in place of the next token.

The text windows are the calibration text's, drawn from the middle of the permutation that calibration,
validation and sensitivity windows share (`luq.calibration.tuning_windows`): disjoint from all three,
so held-out scores stay held out. A run writes a checkpoint every `checkpoint_every` steps into the
cache; the same command resumes from it after an interruption.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from luq.artifact import (CONFIG, REPORT, check_quantization_config, load, set_module, stored_tensor_specs,
                          verify_artifact, write_artifact)
from luq.calibration import text_token_ids, tuning_windows
from luq.checks import check_out_dir
from luq.errors import LuqError
from luq.models.loading import check_device, load_model, parse_dtype
from luq.quant.embedding import QuantEmbedding, TiedQuantHead
from luq.quant.ggml import GGMLWeight, block_type, fp16_fields, with_fp16_fields
from luq.quant.gptq import GPTQWeight
from luq.quant.linear import QuantLinear
from luq.quant.packing import unpack_bits
from luq.store import atomic_write, cache_root

# a scale may shrink to half or grow to twice its solved value, no further (its sign never flips)
SCALE_RANGE = (-0.5, 1.0)
SCHEDULES = ("constant", "cosine")


@dataclass
class TuneConfig:
    """steps: optimizer steps of batch_size windows of seq_len tokens (default: the artifact's calibration
    length), drawn in turn from `windows` windows of `text` (default: the artifact's calibration text).
    lr: Adam's step for the relative scale change t; norm_lr: for the norm weights (0: frozen).
    schedule: "constant" keeps both steps; "cosine" decays them to 0 over the run (half a cosine).
    teacher: the full-precision model (default: the one the artifact was made from)."""

    steps: int = 50
    batch_size: int = 4
    windows: int = 128
    seq_len: int | None = None
    lr: float = 2e-3
    norm_lr: float = 1e-3
    schedule: str = "constant"
    text: str | None = None
    teacher: str | None = None
    seed: int = 0
    checkpoint_every: int = 10

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "windows", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise LuqError(f"tuning {name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.seq_len is not None and self.seq_len < 2:
            raise LuqError(f"tuning --seq-len must be at least 2, got {self.seq_len}")
        if self.lr <= 0 or self.norm_lr < 0:
            raise LuqError(f"tuning needs --lr > 0 and --norm-lr >= 0, got {self.lr} and {self.norm_lr}")
        if self.schedule not in SCHEDULES:
            raise LuqError(f"unknown tuning schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if self.batch_size > self.windows:
            raise LuqError(f"--batch-size {self.batch_size} is more than the {self.windows} --windows")


# ------------------------------------------------------------------------------------ what trains

class _Trainable(nn.Module):
    """Stored scales scale0 made trainable as scale0 * (1 + t); `weight()` the weight they give, `tuned()` the
    stored weight with them."""

    scale0: torch.Tensor
    t: nn.Parameter

    def scales(self) -> torch.Tensor:
        return self.scale0 * (1 + self.t)


class TunedScales(_Trainable):
    """A GPTQ weight with trainable scales: W_hat = scale0 * (1 + t) [row, group] * (code - zero)."""

    def __init__(self, qweight: GPTQWeight):
        super().__init__()
        rows, cols = qweight.shape
        codes = unpack_bits(qweight.qweight, qweight.bits, cols).float()
        if qweight.qzeros is None:
            zeros = torch.full((rows, qweight.n_groups), float(2 ** qweight.bits // 2), device=codes.device)
        else:
            zeros = unpack_bits(qweight.qzeros, qweight.bits, qweight.n_groups).float()
        groups = qweight.column_groups()
        self.source = qweight
        self.register_buffer("groups", groups)
        self.register_buffer("centred", (codes - zeros[:, groups]).to(torch.int16))   # code - zero
        self.register_buffer("scale0", qweight.scales.float())
        self.t = nn.Parameter(torch.zeros_like(self.scale0))

    def weight(self) -> torch.Tensor:
        return self.scales()[:, self.groups] * self.centred

    def tuned(self) -> GPTQWeight:
        """The packed weight with the trained scales (rounded to fp16 as stored), codes unchanged."""
        src = self.source
        return GPTQWeight(src.qweight, self.scales().detach().half().contiguous(), src.qzeros, src.g_idx,
                          src.shape, src.bits, src.group_size)


class TunedBlocks(_Trainable):
    """A weight in a llama.cpp block type with its blocks' scale d trainable: W_hat = d0 * (1 + t) [row, block]
    * basis + offset, where the basis is what the block's codes and integer sub-block scales decode to, and
    the offset what its min field (m or dmin, in the affine types) does, kept as stored: like GPTQ's zeros,
    the offsets do not train. (Trained too, a min moves every weight of its block at once; measured on the
    test model, that made the run diverge at learning rates where scales alone did not.)"""

    def __init__(self, qweight: GGMLWeight):
        super().__init__()
        fields, bases = fp16_fields(qweight)
        self.source, self.block = qweight, block_type(qweight.type).block
        offset = sum((self._spread(fields[..., f]) * bases[f] for f in range(1, fields.shape[-1])),
                     torch.zeros(qweight.shape, device=bases.device))
        self.register_buffer("basis", bases[0])
        self.register_buffer("offset", offset)
        self.register_buffer("mins", fields[..., 1:])
        self.register_buffer("scale0", fields[..., 0])
        self.t = nn.Parameter(torch.zeros_like(self.scale0))

    def _spread(self, per_block: torch.Tensor) -> torch.Tensor:
        return per_block.repeat_interleave(self.block, 1)

    def weight(self) -> torch.Tensor:
        return self._spread(self.scales()) * self.basis + self.offset

    def tuned(self) -> GGMLWeight:
        return with_fp16_fields(self.source, torch.cat([self.scales().detach().unsqueeze(-1), self.mins], -1))


TRAINABLE = {GPTQWeight.method: TunedScales, GGMLWeight.method: TunedBlocks}   # stored method -> what trains


class _TrainLinear(nn.Module):
    def __init__(self, scales: _Trainable, bias: torch.Tensor | None):
        super().__init__()
        self.scales, self.bias = scales, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.scales.weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class _TrainEmbedding(nn.Module):
    def __init__(self, scales: _Trainable, packed: QuantEmbedding):
        super().__init__()
        self.scales, self.multiplier, self.dtype = scales, packed.scale, packed.compute_dtype
        self.padding_idx = packed.padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.scales.weight().to(self.dtype)) * self.multiplier


def attach(model: nn.Module) -> dict[str, _Trainable]:
    """Swap every GPTQ-format or ggml-type packed module of `model` for a trainable one (in place); the
    trainable scales by module name (a tied head shares its embedding's). Other packed modules stay."""
    modules = dict(model.named_modules())
    tuned: dict[str, _Trainable] = {}
    for name, m in modules.items():
        if isinstance(m, QuantEmbedding) and m.weight_config["method"] in TRAINABLE:
            tuned[name] = TRAINABLE[m.weight_config["method"]](m.quantized_weight)
            set_module(model, name, _TrainEmbedding(tuned[name], m))
    for name, m in modules.items():
        if isinstance(m, QuantLinear) and m.weight_config["method"] in TRAINABLE:
            tuned[name] = TRAINABLE[m.weight_config["method"]](m.quantized_weight)
            set_module(model, name, _TrainLinear(tuned[name], m.bias))
        elif isinstance(m, TiedQuantHead):
            owner = next((n for n, e in modules.items() if e is m.embedding), None)
            if owner in tuned:
                set_module(model, name, _TrainLinear(tuned[owner], m.bias))
    return tuned


def detach(model: nn.Module, tuned: dict[str, _Trainable]) -> None:
    """Put packed modules back in place of the trainable ones, with the trained scales."""
    modules = dict(model.named_modules())
    embeddings: dict[int, QuantEmbedding] = {}
    for name, m in modules.items():
        if isinstance(m, _TrainEmbedding):
            packed = QuantEmbedding(m.scales.tuned(), m.padding_idx, m.multiplier, m.dtype)
            embeddings[id(m.scales)] = packed
            set_module(model, name, packed)
    for name, m in modules.items():
        if isinstance(m, _TrainLinear):
            if id(m.scales) in embeddings:
                set_module(model, name, TiedQuantHead(embeddings[id(m.scales)], m.bias))
            else:
                bias = None if m.bias is None else m.bias.detach()
                set_module(model, name, QuantLinear(m.scales.tuned(), bias))


def norm_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The weights of the model's normalisation layers (RMSNorm, LayerNorm): by module class name."""
    return [p for m in model.modules() if "norm" in type(m).__name__.lower()
            for p in m.parameters(recurse=False)]


# ------------------------------------------------------------------------------------ the loss

def distillation_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(p_teacher || p_student), in nats."""
    log_p = F.log_softmax(teacher_logits.float(), -1)
    log_q = F.log_softmax(student_logits.float(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


# ------------------------------------------------------------------------------------ the run

def tune(artifact: Path | str, out: Path | str, config: TuneConfig = TuneConfig(), device: str | torch.device = "cpu",
         progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Tune the artifact at `artifact` (see the module doc) and write the result to `out` (which may be `artifact`
    itself: it is replaced only once the tuned one is written); returns the written report."""
    from tqdm.auto import tqdm

    artifact, out = Path(artifact), Path(out)
    manifest = verify_artifact(artifact)
    if out.resolve() != artifact.resolve():   # the same path: replaced at the end, atomically
        check_out_dir(out)
    report = json.loads((artifact / REPORT).read_text())
    source_config = json.loads((artifact / CONFIG).read_text())
    qconfig = check_quantization_config(source_config.get("quantization_config"), artifact)
    device = check_device(device)
    t_start = time.perf_counter()
    student, tokenizer, _ = load(artifact, device, torch.float32, verify=False)
    student.config._name_or_path = source_config.get("_name_or_path", "")   # the model's, not the artifact's path
    teacher_name = config.teacher or report.get("model")
    teacher, _, _ = load_model(teacher_name, device, torch.float32)
    _check_teacher(teacher, student, teacher_name)
    tuned = attach(student)
    if not tuned:
        raise LuqError(f"{artifact} has no GPTQ-format or llama.cpp-type weight: nothing for luq tune to train "
                       "(binarized weights keep their scales)")

    calibration = report.get("calibration") or {}
    seq_len = config.seq_len or int(calibration.get("seq_len") or 256)
    text = config.text if config.text is not None else calibration.get("text")
    windows = tuning_windows(text_token_ids(tokenizer, text), config.windows, seq_len, int(calibration.get("seed", 0)))

    for p in student.parameters():
        p.requires_grad_(False)
    scale_params = [s.t for s in dict.fromkeys(tuned.values())]
    norms = norm_parameters(student) if config.norm_lr > 0 else []
    for p in scale_params + norms:
        p.requires_grad_(True)
    groups = [{"params": scale_params, "lr": config.lr}] + ([{"params": norms, "lr": config.norm_lr}] if norms else [])
    optimizer = torch.optim.Adam(groups)
    order = _window_order(config, windows.shape[0])

    key = _run_key(manifest, config, seq_len, text, teacher_name)
    checkpoint = cache_root() / "tune" / f"{key}.pt"
    losses: list[float] = []
    start = _resume(checkpoint, scale_params + norms, optimizer, losses)
    if start:
        log(f"resuming the tuning at step {start} of {config.steps} ({checkpoint})")
    student.train()
    bar = tqdm(total=config.steps, initial=start, desc="tune", unit="step", disable=not progress)
    for step in range(start, config.steps):
        batch = windows[order[step]].to(device)
        for group, base in zip(optimizer.param_groups, (config.lr, config.norm_lr), strict=False):
            group["lr"] = base * lr_factor(config, step)   # set, not stepped: a resumed run sets the same
        with torch.no_grad():
            target = teacher(input_ids=batch, use_cache=False).logits
        loss = distillation_kl(target, student(input_ids=batch, use_cache=False).logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for t in scale_params:
                t.clamp_(*SCALE_RANGE)
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(kl=f"{losses[-1]:.4f}")
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            _save_checkpoint(checkpoint, step + 1, scale_params + norms, optimizer, losses)
    bar.close()
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    moved = torch.cat([t.detach().abs().flatten() for t in scale_params])
    detach(student, tuned)
    del teacher

    head = max(1, min(10, len(losses) // 4))
    report = dict(report)
    report["tuning"] = {
        **{k: v for k, v in asdict(config).items() if k not in ("text", "teacher", "checkpoint_every")},
        "seq_len": seq_len, "text": text, "teacher": teacher_name, "source": str(artifact),
        "source_manifest_sha256": hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest(),
        "tuned_weights": len(scale_params), "tuned_scales": int(moved.numel()),
        "tuned_norm_weights": int(sum(p.numel() for p in norms)),
        "scale_change": {"mean": float(moved.mean()), "max": float(moved.max())},
        "kl_first_steps": sum(losses[:head]) / head, "kl_last_steps": sum(losses[-head:]) / head,
        "kl_by_step": [round(v, 5) for v in losses],
        # the source's KL on its sensitivity windows measured the untuned weights
        "measured_cost_before": report.get("measured_cost"),
    }
    report["measured_cost"] = None
    seconds = dict(report.get("seconds") or {})
    seconds["tune"] = round(time.perf_counter() - t_start, 1)
    report["seconds"] = seconds
    storage_dtype = parse_dtype(qconfig["storage_dtype"])
    qconfig = {k: v for k, v in qconfig.items() if k not in ("quant_method", "format_version")}
    written = write_artifact(out, student, tokenizer, qconfig, report, storage_dtype,
                             vector_dtype=_vector_dtype(artifact, storage_dtype))
    if written != report["total_bytes"]:
        raise RuntimeError(f"the tuned artifact holds {written} tensor bytes, its source {report['total_bytes']}")
    checkpoint.unlink(missing_ok=True)
    first, last = report["tuning"]["kl_first_steps"], report["tuning"]["kl_last_steps"]
    log(f"tuned {len(scale_params)} weights' scales over {config.steps} steps: KL {first:.4f} -> {last:.4f} on the "
        f"tuning windows; wrote {out}")
    return json.loads((out / REPORT).read_text())


def _check_teacher(teacher: nn.Module, student: nn.Module, name: str) -> None:
    t, s = teacher.get_output_embeddings(), student.get_output_embeddings()
    t_shape = tuple(t.weight.shape) if t is not None else None
    s_shape = (s.out_features, s.in_features) if s is not None and hasattr(s, "out_features") else None
    if t_shape is not None and s_shape is not None and t_shape != s_shape:
        raise LuqError(f"teacher {name!r} has an output head of {t_shape}, the quantized model {s_shape}: "
                       "give the model it was made from (--teacher)")


def lr_factor(config: TuneConfig, step: int) -> float:
    """The learning rates' multiplier at a step: 1, or half a cosine from 1 at step 0 to 0 after the last."""
    if config.schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * min(step, config.steps) / config.steps))


def _window_order(config: TuneConfig, n_windows: int) -> list[torch.Tensor]:
    """The windows of each step: seeded passes over all windows, each a fresh permutation."""
    g = torch.Generator().manual_seed(config.seed)
    flat = torch.cat([torch.randperm(n_windows, generator=g)
                      for _ in range(-(-config.steps * config.batch_size // n_windows))])
    return [flat[i * config.batch_size:(i + 1) * config.batch_size] for i in range(config.steps)]


def _vector_dtype(artifact: Path, storage_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype the source stored its 1-D float tensors at, where it differs from the storage dtype (GGUF's)."""
    for shape, dtype in stored_tensor_specs(artifact).values():
        if len(shape) == 1 and dtype.is_floating_point:
            return dtype if dtype != storage_dtype else None
    return None


def _run_key(manifest: dict, config: TuneConfig, seq_len: int, text, teacher) -> str:
    settings = {k: v for k, v in asdict(config).items() if k != "checkpoint_every"}
    what = {"source": manifest["files"], "config": settings, "seq_len": seq_len, "text": text, "teacher": teacher}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _save_checkpoint(path: Path, step: int, params: list[torch.Tensor], optimizer, losses: list[float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "params": [p.detach().cpu() for p in params], "optimizer": optimizer.state_dict(),
             "losses": list(losses)}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _resume(path: Path, params: list[torch.Tensor], optimizer, losses: list[float]) -> int:
    """The step to start from: a checkpoint's (its values put in place), else 0."""
    if not path.is_file():
        return 0
    try:
        state = torch.load(path, weights_only=True)
        with torch.no_grad():
            for p, v in zip(params, state["params"], strict=True):
                p.copy_(v)
        optimizer.load_state_dict(state["optimizer"])
    except Exception:   # unreadable or from another layout: start over
        path.unlink(missing_ok=True)
        return 0
    losses.extend(state["losses"])
    return int(state["step"])
