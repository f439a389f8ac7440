"""Writing files so that nothing half-written is ever read; the quantized-model artifact.

An artifact is a directory: `config.json` (the base model's, plus a
`quantization_config` naming luq, its format version and every quantized module's
settings), the tensors in safetensors (sharded when large; packed weights as stored,
everything else at the storage dtype), the processor or tokenizer files,
`luq_report.json`, and `luq_manifest.json` (format version, size and sha256 of every
file), written last. The directory is built beside its destination and renamed into
place, so a reader sees either nothing or all of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from luq.errors import LuqError
from luq.quant.embedding import QuantEmbedding, TiedQuantHead, embed_scale
from luq.models.loading import check_device
from luq.quant.linear import QuantLinear, kernel_line, kernels_by_format
from luq.tensorfile import TensorFiles, write_safetensors


def cache_root() -> Path:
    """``$LUQ_CACHE`` if set, else ``~/.cache/luq`` (created on demand): variant caches, built models,
    compiled helpers' sources of truth live under it."""
    root = Path(os.environ.get("LUQ_CACHE") or Path.home() / ".cache" / "luq").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build_dir_once(target: Path, build: Callable[[Path], None]) -> Path:
    """`target` if it exists, else `build(tmp)` into a temporary sibling directory that is
    then renamed into place (a concurrent builder that wins the race is fine)."""
    target = Path(target)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_json(path: Path, data: dict) -> None:
    """`data` as indented JSON at `path`, atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1) + "\n"))


# ---------------------------------------------------------------------------------
# the quantized-model artifact

FORMAT_VERSION = 1
MANIFEST = "luq_manifest.json"
REPORT = "luq_report.json"
DEFAULT_SHARD_BYTES = 2 * 10**9


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes (hex), read 4 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


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


def artifact_config(model: nn.Module, config, plan: dict[str, str]) -> dict:
    """The artifact's quantization_config: every packed module's settings (linears, embeddings, heads tied
    to a packed embedding), the plan and the settings of each of its formats."""
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
        config["quantization_config"] = dict(quantization_config, quant_method="luq", format_version=FORMAT_VERSION)
        (tmp / "config.json").write_text(json.dumps(config, indent=1, default=str) + "\n")
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
    if version > FORMAT_VERSION:
        raise LuqError(f"{path} was written by a newer luq (format {version}; this luq reads up to "
                       f"{FORMAT_VERSION}); upgrade luq")
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


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every stored tensor of an artifact, by name, at its stored dtype."""
    files = TensorFiles.in_dir(path)
    return {key: files.read(key) for key in files.keys()}


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

    path = Path(path)
    if verify:
        verify_artifact(path)
    elif not (path / MANIFEST).is_file():
        raise LuqError(f"{path} is not a complete luq artifact (no {MANIFEST})")
    config = AutoConfig.from_pretrained(path)
    qconfig = getattr(config, "quantization_config", None)
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") != "luq":
        raise LuqError(f"{path}/config.json has no luq quantization_config")
    if int(qconfig.get("format_version", 0)) > FORMAT_VERSION:
        raise LuqError(f"{path} was written by a newer luq (format {qconfig['format_version']}); upgrade luq")
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
    from luq.models.streaming import _set_tensor
    from luq.quant import weight_from_state_dict

    files = TensorFiles.in_dir(path)  # read one tensor at a time: memory ends near the artifact's size
    remaining = set(files.keys())

    def take(key: str, as_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The stored tensor `key` (with as_dtype: a floating one converted as it is read, so its
        stored copy is never whole in memory beside the converted one)."""
        remaining.discard(key)
        return files.read(key, as_dtype)

    tied_heads = qconfig.get("tied_heads", {})
    for name, wconfig in qconfig.get("embeddings", {}).items():
        prefix = name + "."
        own = {k[len(prefix):]: take(k) for k in sorted(remaining) if k.startswith(prefix)}
        embedding = model.get_submodule(name)
        if tuple(embedding.weight.shape) != tuple(wconfig["shape"]):
            raise LuqError(f"corrupt artifact {path}: {name} is {wconfig['shape']}, the model expects "
                           f"{list(embedding.weight.shape)}")
        quantized = QuantEmbedding(weight_from_state_dict(own, wconfig), embedding.padding_idx,
                                   embed_scale(embedding), dtype)
        _set_module(model, name, quantized)
        for head, source in tied_heads.items():
            if source == name:
                bias = take(head + ".bias", dtype) if head + ".bias" in remaining else None
                _set_module(model, head, TiedQuantHead(quantized, bias))
    modules = qconfig["modules"]
    for name, wconfig in modules.items():
        prefix = name + "."
        own = {k[len(prefix):]: take(k) for k in sorted(remaining) if k.startswith(prefix) and k != prefix + "bias"}
        bias = take(prefix + "bias", dtype) if prefix + "bias" in remaining else None
        linear = model.get_submodule(name)
        if (linear.out_features, linear.in_features) != tuple(wconfig["shape"]):
            raise LuqError(f"corrupt artifact {path}: {name} is {wconfig['shape']}, the model expects "
                           f"{[linear.out_features, linear.in_features]}")
        owner, _, attr = name.rpartition(".")
        qlinear = QuantLinear(weight_from_state_dict(own, wconfig), bias)
        setattr(model.get_submodule(owner), attr, qlinear)
    state = model.state_dict(keep_vars=True)
    unexpected = sorted(remaining - set(state))
    if unexpected:
        raise LuqError(f"corrupt artifact {path}: unexpected tensors {unexpected[:3]}")
    for key in sorted(remaining):
        _set_tensor(model, key, take(key, dtype))  # integer tensors are read as stored
    if not tied_heads:  # a head tied to a packed embedding was rebuilt above
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise LuqError(f"corrupt or partial artifact {path}: no stored value for {missing[:3]}")
    model = model.to(check_device(device)).eval()
    model.luq_kernels = kernels_by_format(model, qconfig.get("plan", {}))
    if log is not None:
        log(kernel_line(model.luq_kernels))
    return model, auto_pre.from_pretrained(path), adapter


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, attr, module)


def read_jsonl(path: Path):
    """(line number, 'file:line', record) for each non-blank line of a JSONL file;
    a line that is not a JSON object is one LuqError naming its place."""
    with Path(path).open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise LuqError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise LuqError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield number, where, record
