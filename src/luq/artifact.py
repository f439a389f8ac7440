"""The quantized-model artifact: the one module that knows its layout, and writes, checks and reads it.

An artifact is a directory:

- `config.json` (CONFIG): the base model's config plus a `quantization_config`: `quant_method` "luq",
  `format_version`, `luq_version`, `storage_dtype`, `allocate`, `modules` (each quantized linear's weight
  config, by module name), `embeddings` (each packed embedding's), `tied_heads` (an output head -> the
  packed embedding it computes from), `plan` (linear -> format) and `formats` (each format's settings);
- the tensors in safetensors (`model.safetensors`, or shards with `model.safetensors.index.json` when
  large): packed weights as stored, every other floating tensor at the storage dtype (1-D ones at
  float32 for a model bound for GGUF), a tensor tied to an earlier one (head and embedding) once;
- the processor or tokenizer files;
- `luq_report.json` (REPORT): how the run went (`luq.report.build_report`);
- `luq_manifest.json` (MANIFEST), written last: the format version, size and sha256 of every file.

`write_artifact` builds the directory beside its destination and renames it into place, so a reader
sees either nothing or all of it. Every reader checks it with `verify_artifact` and rebuilds its packed
modules with `rebuild_quantized_modules`: `load` (luq.load), `luq.hf` (transformers' from_pretrained),
and `luq.export.gguf` reads its tensors (`read_tensors`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from luq.errors import LuqError
from luq.models.loading import check_device
from luq.quant import weight_from_state_dict
from luq.quant.embedding import QuantEmbedding, TiedQuantHead, embed_scale
from luq.quant.linear import QuantLinear, kernel_line, kernels_by_format
from luq.store import file_sha256
from luq.tensorfile import TensorFiles, write_safetensors

CONFIG = "config.json"
REPORT = "luq_report.json"
MANIFEST = "luq_manifest.json"
QUANT_METHOD = "luq"        # quantization_config["quant_method"]; transformers' name for luq's quantizer
FORMAT_VERSION = 1
DEFAULT_SHARD_BYTES = 2 * 10**9


def is_artifact(path: Path | str | None) -> bool:
    """Whether `path` looks like a luq artifact (it holds a report); `verify_artifact` checks it."""
    return path is not None and Path(str(path)).expanduser().joinpath(REPORT).is_file()


def check_format_version(version, where: Path | str) -> None:
    """One LuqError if `version` (of the artifact at `where`) is newer than this luq reads."""
    if int(version) > FORMAT_VERSION:
        raise LuqError(f"this luq reads artifact formats up to {FORMAT_VERSION}; {where} was written in format "
                       f"{int(version)} by a newer luq: upgrade luq")


# ---------------------------------------------------------------------------------------------- writing

def _stored_items(model: nn.Module, storage_dtype: torch.dtype, vector_dtype: torch.dtype | None = None):
    """(name, tensor, dtype it is stored at) for every tensor the artifact holds: packed
    buffers of QuantLinear modules as they are, every other floating tensor at
    `storage_dtype` (1-D ones at `vector_dtype` when given: GGUF's float32 norms), tensors tied to an
    earlier one (lm_head and the embedding) once."""
    packed = {f"{name}.{b}" for name, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))
              for b in m.stored_names}
    seen: set[tuple] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        # a meta tensor (a streamed layer) has no storage: ties are the same tensor object
        key = ("meta", id(t)) if t.device.type == "meta" else (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen and t.numel():
            continue
        seen.add(key)
        if name in packed or not t.is_floating_point():
            yield name, t, t.dtype
        else:
            yield name, t, (vector_dtype if vector_dtype is not None and t.dim() == 1 else storage_dtype)


def artifact_tensors(model: nn.Module, storage_dtype: torch.dtype,
                     vector_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor the artifact stores, by state-dict name, on the CPU at its stored dtype
    (an in-memory model only; `write_artifact` also takes a streamed one)."""
    return {name: t.detach().to("cpu", dtype).contiguous()
            for name, t, dtype in _stored_items(model, storage_dtype, vector_dtype)}


def stored_bytes(model: nn.Module, storage_dtype: torch.dtype, exclude: set[str] = frozenset(),
                 vector_dtype: torch.dtype | None = None) -> int:
    """Bytes `artifact_tensors` would hold, without copying anything; `exclude` names are skipped."""
    return sum(t.numel() * torch.empty((), dtype=dtype).element_size()
               for name, t, dtype in _stored_items(model, storage_dtype, vector_dtype) if name not in exclude)


def _spec_bytes(spec: tuple[torch.dtype, tuple[int, ...]]) -> int:
    return torch.empty((), dtype=spec[0]).element_size() * int(torch.Size(spec[1]).numel())


def _fill_from_model(model: nn.Module, tensors: dict[str, tuple[torch.Tensor, torch.dtype]]):
    """fill(put) for `write_safetensors`: each named tensor's values at its stored dtype; the
    tensors of a streamed layer are read with that layer, one layer at a time."""
    from luq.models.streaming import layer_on, stream_of

    def fill(put):
        for name, (t, dtype) in tensors.items():
            if t.device.type != "meta":
                put(name, t.detach().to("cpu", dtype))
        for prefix, module in model.named_modules():
            if stream_of(module) is None:
                continue
            prefix += "."
            mine = [n for n in tensors if n.startswith(prefix)]
            if mine:
                with layer_on(module, "cpu"):
                    state = module.state_dict()
                    for name in mine:
                        put(name, state[name[len(prefix):]].to(tensors[name][1]))
    return fill


def _write_shards(model: nn.Module, storage_dtype: torch.dtype, folder: Path, max_shard_bytes: int,
                  vector_dtype: torch.dtype | None = None) -> int:
    """The model's stored tensors as safetensors shards in `folder` (with an index when more than
    one), written tensor by tensor; returns their bytes."""
    items = {name: (t, dtype) for name, t, dtype in _stored_items(model, storage_dtype, vector_dtype)}
    specs = {name: (dtype, tuple(t.shape)) for name, (t, dtype) in items.items()}
    shards: list[list[str]] = [[]]
    size = 0
    for name, spec in specs.items():
        nbytes = _spec_bytes(spec)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    total = sum(_spec_bytes(spec) for spec in specs.values())
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        index = {"metadata": {"total_size": total},
                 "weight_map": {t: names[i] for i, shard in enumerate(shards) for t in shard}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    for name, shard in zip(names, shards):
        write_safetensors(folder / name, {n: specs[n] for n in shard}, _fill_from_model(model, {n: items[n] for n in shard}),
                          {"format": "pt"})
    return total


def quantization_config(model: nn.Module, config, plan: dict[str, str]) -> dict:
    """The artifact's quantization_config (less quant_method and format_version, which `write_artifact`
    adds): every packed module's settings (linears, embeddings, heads tied to a packed embedding), the
    plan and the settings of each of its formats."""
    from luq.version import __version__
    from luq.plan import KEEP
    from luq.quant.formats import get_format

    modules = dict(model.named_modules())
    return {"luq_version": __version__, "storage_dtype": config.storage_dtype, "allocate": config.allocate,
            "modules": {name: m.weight_config for name, m in modules.items() if isinstance(m, QuantLinear)},
            "embeddings": {name: m.weight_config for name, m in modules.items() if isinstance(m, QuantEmbedding)},
            "tied_heads": {name: next(n for n, e in modules.items() if e is m.embedding)
                           for name, m in modules.items() if isinstance(m, TiedQuantHead)},
            "plan": plan, "formats": {f: get_format(f).settings() for f in sorted(set(plan.values()) - {KEEP})}}


def write_artifact(out: Path, model: nn.Module, processor, quantization_config: dict, report: dict,
                   storage_dtype: torch.dtype, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                   vector_dtype: torch.dtype | None = None, describe: Callable[[Path], dict] | None = None) -> int:
    """Write the quantized model to directory `out`, atomically: everything goes to a
    temporary sibling directory, the checksum manifest last, then one rename puts it in
    place (an existing `out` is replaced only then). describe(folder): more report fields, read from
    the written tensors and config before the report is (e.g. the GGUF file's bytes). Returns the
    stored tensor bytes."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        config = model.config.to_dict()
        config["quantization_config"] = dict(quantization_config, quant_method=QUANT_METHOD,
                                             format_version=FORMAT_VERSION)
        (tmp / CONFIG).write_text(json.dumps(config, indent=1, default=str) + "\n")
        stored = _write_shards(model, storage_dtype, tmp, max_shard_bytes, vector_dtype)
        if processor is not None:
            processor.save_pretrained(tmp)
        if describe is not None:
            report.update(describe(tmp))
        (tmp / REPORT).write_text(json.dumps(dict(report, total_bytes=stored), indent=1) + "\n")
        files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, "files": files}, indent=1) + "\n")
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return stored


# ---------------------------------------------------------------------------------------------- reading

def verify_artifact(path: Path) -> dict:
    """The artifact's manifest after checking every file it lists (size, then sha256);
    one LuqError naming the first problem: not an artifact, partial, corrupt, newer format."""
    path = Path(path)
    if not path.is_dir():
        raise LuqError(f"no quantized model at {path}")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise LuqError(f"{path} is not a complete luq artifact (no {MANIFEST}; partial write or another format)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        version = int(manifest["format_version"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise LuqError(f"{manifest_path} is corrupt") from None
    check_format_version(version, path)
    for name, expected in files.items():
        p = path / name
        if not p.is_file():
            raise LuqError(f"corrupt or partial artifact {path}: {name} is missing")
        if p.stat().st_size != expected["bytes"]:
            raise LuqError(f"corrupt or partial artifact {path}: {name} is {p.stat().st_size:,} bytes, "
                           f"expected {expected['bytes']:,}")
        if file_sha256(p) != expected["sha256"]:
            raise LuqError(f"corrupt artifact {path}: {name} does not match its checksum")
    return manifest


def check_quantization_config(qconfig, path: Path) -> dict:
    """`qconfig` (config.json's quantization_config of the artifact at `path`) if luq wrote it in a
    format this luq reads; else one LuqError."""
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") != QUANT_METHOD:
        raise LuqError(f"{path}/{CONFIG} has no luq quantization_config")
    check_format_version(qconfig.get("format_version", 0), path)
    return qconfig


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every stored tensor of an artifact, by name, at its stored dtype."""
    files = TensorFiles.in_dir(path)
    return {key: files.read(key) for key in files.keys()}


def stored_tensor_specs(folder: Path) -> dict[str, tuple[list[int], torch.dtype]]:
    """Shape and dtype of every tensor an artifact stores, from the safetensors headers alone."""
    files = TensorFiles.in_dir(folder)
    return {name: (list(shape), dtype) for name in files.keys() for dtype, shape in [files.spec(name)]}


def rebuild_quantized_modules(model: nn.Module, qconfig: Mapping, keys: Iterable[str],
                              tensor: Callable[[str, torch.dtype | None], torch.Tensor], dtype: torch.dtype,
                              path: Path | str) -> None:
    """Put the artifact's packed modules into `model` (built from its config.json): each packed embedding
    (qconfig["embeddings"]) becomes a QuantEmbedding, each head tied to one (qconfig["tied_heads"]) a
    TiedQuantHead over it, each linear of qconfig["modules"] a QuantLinear. keys: the stored tensors'
    names; tensor(key, as_dtype): that tensor, as stored (as_dtype None) or at as_dtype (biases, at
    `dtype`): read from the files (luq.load), or an empty one of the stored shape on the meta device for
    transformers to fill (luq.hf). `path` names the artifact in errors."""
    keys = set(keys)

    def submodule(name: str) -> nn.Module:
        try:
            return model.get_submodule(name)
        except AttributeError:
            raise LuqError(f"the artifact {path} quantizes {name}, which this {type(model).__name__} does not "
                           "have") from None

    def packed_weight(name: str, wconfig: Mapping, expected: list[int]):
        if list(wconfig["shape"]) != list(expected):
            raise LuqError(f"corrupt artifact {path}: {name} is {list(wconfig['shape'])}, the model expects "
                           f"{list(expected)}")
        prefix = name + "."
        own = {k[len(prefix):]: tensor(k, None) for k in sorted(keys)
               if k.startswith(prefix) and "." not in k[len(prefix):] and k != prefix + "bias"}
        return weight_from_state_dict(own, wconfig)

    def bias(name: str) -> torch.Tensor | None:
        return tensor(name + ".bias", dtype) if name + ".bias" in keys else None

    tied_heads = qconfig.get("tied_heads") or {}
    for name, wconfig in (qconfig.get("embeddings") or {}).items():
        embedding = submodule(name)
        packed = QuantEmbedding(packed_weight(name, wconfig, list(embedding.weight.shape)), embedding.padding_idx,
                                embed_scale(embedding), dtype)
        set_module(model, name, packed)
        for head, source in tied_heads.items():
            if source == name:
                set_module(model, head, TiedQuantHead(packed, bias(head)))
    for name, wconfig in (qconfig.get("modules") or {}).items():
        linear = submodule(name)
        weight = packed_weight(name, wconfig, [linear.out_features, linear.in_features])
        set_module(model, name, QuantLinear(weight, bias(name)))


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted name `name` of `model`."""
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, attr, module)


def load(path: Path | str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
         verify: bool = True, log: Callable[[str], None] | None = None):
    """A quantized model from its artifact directory: (model, processor or tokenizer, adapter).

    Quantized linears come back as QuantLinear modules holding the packed tensors
    (their stored dtypes kept); every other floating tensor is cast to `dtype`. The
    artifact is checked against its manifest first (`verify=False` skips the sha256s
    but not the format checks). Each linear's kernel is built here, for `device`, so that any
    slower path warns at load (luq.errors.FallbackWarning); `model.luq_kernels` says which kernel
    serves each format ({format: {kernel: linears}}), and `log`, if given, gets that as one line.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from luq.models import adapter_for
    from luq.models.streaming import _set_tensor

    path = Path(path)
    if verify:
        verify_artifact(path)
    elif not (path / MANIFEST).is_file():
        raise LuqError(f"{path} is not a complete luq artifact (no {MANIFEST})")
    config = AutoConfig.from_pretrained(path)
    qconfig = check_quantization_config(getattr(config, "quantization_config", None), path)
    del config.quantization_config
    adapter = adapter_for(config.model_type)
    if adapter.multimodal:
        from transformers import AutoModelForImageTextToText as auto_model
        from transformers import AutoProcessor as auto_pre
    else:
        from transformers import AutoModelForCausalLM as auto_model
        from transformers import AutoTokenizer as auto_pre
    with init_empty_weights(include_buffers=False):
        model = auto_model.from_config(config)

    files = TensorFiles.in_dir(path)  # read one tensor at a time: memory ends near the artifact's size
    remaining = set(files.keys())

    def take(key: str, as_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The stored tensor `key` (with as_dtype: a floating one converted as it is read, so its
        stored copy is never whole in memory beside the converted one)."""
        remaining.discard(key)
        return files.read(key, as_dtype)

    rebuild_quantized_modules(model, qconfig, files.keys(), take, dtype, path)
    unexpected = sorted(remaining - set(model.state_dict(keep_vars=True)))
    if unexpected:
        raise LuqError(f"corrupt artifact {path}: unexpected tensors {unexpected[:3]}")
    for key in sorted(remaining):
        _set_tensor(model, key, take(key, dtype))  # integer tensors are read as stored
    if not qconfig.get("tied_heads"):  # a head tied to a packed embedding was rebuilt above
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise LuqError(f"corrupt or partial artifact {path}: no stored value for {missing[:3]}")
    model = model.to(check_device(device)).eval()
    model.luq_kernels = kernels_by_format(model, qconfig.get("plan", {}))
    if log is not None:
        log(kernel_line(model.luq_kernels))
    return model, auto_pre.from_pretrained(path), adapter
