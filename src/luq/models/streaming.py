"""A model whose decoder layers stay on disk until the pass reaches them.

`load_streaming` builds the model's skeleton on the meta device and materializes only
what runs outside the decoder (embeddings, vision tower, projector, final norm, output
head, rotary buffers). Each decoder layer gets a `LayerStream`: where its tensors lie in
the safetensors shards, under the names transformers' key renames give them (LLaVA and
Qwen2.5-VL hub checkpoints use older names). `layer_on(layer, device)` is the one way
a stage uses a layer: an in-memory layer is moved to the device and back; a streamed one
is read from the shards onto the device and freed (back to meta) afterwards, so a pass
holds one layer at a time.

A plan can be put into a streamed model too: swapping a meta nn.Linear for a QuantLinear
(`replace_linears`) leaves meta buffers of the right shapes; `add_source` tells the
layer's stream where their bytes are (the variant cache), and they are read with the rest
of the layer. Everything that needs only names, shapes and dtypes (sizes, the artifact's
header, the module configs) works on the skeleton as it is.
"""

from __future__ import annotations

import ctypes
import itertools
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from torch import nn

from luq.errors import LuqError
from luq.models import Adapter
from luq.tensorfile import TensorFiles, tensor_digest

_STREAM = "_luq_stream"


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put `value` in place of the parameter or buffer `name` (relative to `root`)."""
    owner, _, attr = name.rpartition(".")
    module = root.get_submodule(owner) if owner else root
    if attr in module._parameters:
        old = module._parameters[attr]
        if not isinstance(value, nn.Parameter):
            value = nn.Parameter(value, requires_grad=old.requires_grad and value.is_floating_point())
        module._parameters[attr] = value
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:
        raise KeyError(name)


def _holds(root: nn.Module, name: str) -> bool:
    """Whether `name` (relative to `root`) is a parameter or buffer slot, even an empty one (a
    QuantLinear's buffer handed over to its kernel)."""
    owner, _, attr = name.rpartition(".")
    try:
        module = root.get_submodule(owner) if owner else root
    except AttributeError:
        return False
    return attr in module._parameters or attr in module._buffers


class LayerStream:
    """Where one decoder layer's tensors are when it is not in memory.

    keys: tensor name relative to the layer -> its name in the checkpoint files. dtype:
    what floating checkpoint tensors are cast to (the model's dtype). Sources added with
    `add_source` (packed weights of a plan) take precedence over the checkpoint.
    """

    def __init__(self, files: TensorFiles, keys: dict[str, str], dtype: torch.dtype):
        self.files, self.keys, self.dtype = files, keys, dtype
        self.sources: list[tuple[frozenset[str], Callable[[], dict[str, torch.Tensor]]]] = []
        self.digest: str | None = None
        self._kept: dict[str, torch.Tensor] = {}
        self._depth = 0  # nested uses (e.g. the layer's digest taken while a pass holds it) read it once

    def add_source(self, names, fetch: Callable[[], dict[str, torch.Tensor]]) -> None:
        """`fetch()` returns (at least) the tensors `names` (relative to the layer), at their stored dtypes."""
        self.sources.append((frozenset(names), fetch))

    def clear_sources(self) -> None:
        self.sources = []

    def read(self, name: str) -> torch.Tensor:
        return self.files.read(self.keys[name], self.dtype)  # floating tensors converted as they are read

    def load(self, layer: nn.Module, device: torch.device | str) -> None:
        self._depth += 1
        if self._depth > 1:  # already in memory: the outermost use frees it
            return
        try:
            self._load(layer, device)
        except BaseException:
            self._depth = 0
            raise

    def _load(self, layer: nn.Module, device: torch.device | str) -> None:
        wanted = [n for n, t in layer.state_dict(keep_vars=True).items() if t.device.type == "meta"]
        values: dict[str, torch.Tensor] = {}
        for names, fetch in self.sources:
            if names.intersection(wanted):
                values.update((n, t) for n, t in fetch().items() if n in names)
        for name in wanted:
            if name not in values:
                if name not in self.keys:
                    raise LuqError(f"the checkpoint has no tensor for decoder-layer weight {name}")
                values[name] = self.read(name)
        state = layer.state_dict(keep_vars=True)
        self._kept = {}  # the skeleton's own tensors, put back on release (ties are the same object)
        for name in wanted:
            self._kept[name] = state[name]
            _set_tensor(layer, name, values.pop(name).to(device))
        for name, buf in layer.named_buffers():  # non-persistent buffers built with the skeleton
            if buf.device.type != "meta" and name not in wanted:
                self._kept[name] = buf
                _set_tensor(layer, name, buf.to(device))

    def release(self, layer: nn.Module) -> None:
        self._depth -= 1
        if self._depth > 0:
            return
        for name, kept in self._kept.items():
            if _holds(layer, name):  # a module swapped meanwhile and swapped back keeps its own tensors
                _set_tensor(layer, name, kept)
        self._kept = {}
        _drop_derived(layer)
        release_freed_memory()


def _drop_derived(layer: nn.Module) -> None:
    """Free what modules built from the tensors just put back on disk (a QuantLinear's fast
    kernel): it is not a parameter or buffer, so swapping those does not free it."""
    for module in layer.modules():
        drop = getattr(module, "drop_derived", None)
        if drop is not None:
            drop()


def _libc():
    """glibc, or False elsewhere (musl, macOS): then the two calls below do nothing."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim, _LIBC.mallopt  # noqa: B018 - both must exist
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def release_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise: after a few layers the
    resident size would be the sum of every layer's fragments, not one layer's)."""
    if _libc():
        _LIBC.malloc_trim(0)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def map_large_allocations(threshold: int = 1 << 20) -> None:
    """Serve every allocation of `threshold` bytes or more from a mapping of its own, unmapped
    when freed. glibc's default threshold rises to 32 MB after the first large block is freed,
    so a layer's 1-32 MB temporaries (Hessians, GPTQ's blocks, activations) then come from the
    heap, whose freed holes stay resident until trimmed."""
    if _libc():
        _LIBC.mallopt(_M_MMAP_THRESHOLD, threshold)


_LIBC = None


def stream_of(layer: nn.Module) -> LayerStream | None:
    return getattr(layer, _STREAM, None)


def is_streamed(model: nn.Module) -> bool:
    """Whether some of the model's layers live on disk (built by `load_streaming`)."""
    return any(stream_of(m) is not None for m in model.modules())


@contextmanager
def layer_on(layer: nn.Module, device: torch.device | str) -> Iterator[nn.Module]:
    """The layer with its tensors on `device` for the duration of the block: an in-memory layer
    is moved there and back; a streamed layer is read from disk and freed afterwards."""
    stream = stream_of(layer)
    if stream is None:
        homes = [t.device for t in itertools.chain(layer.parameters(), layer.buffers())]
        if not homes:  # nothing of its own (a head tied to a packed embedding)
            yield layer
            return
        home = homes[0]
        layer.to(device)
        try:
            yield layer
        finally:
            layer.to(home)
        return
    stream.load(layer, device)
    try:
        yield layer
    finally:
        stream.release(layer)


def model_device(model: nn.Module) -> torch.device:
    """Where the model's materialized tensors are (the first one not on the meta device)."""
    return next(t.device for t in itertools.chain(model.parameters(), model.buffers()) if t.device.type != "meta")


class StoredWeights(Mapping):
    """Module name -> its `weight`, as the model holds it or, for a module of a streamed part
    (embedding, head, vision tower), read from the checkpoint when asked: a stage that goes
    through several such weights holds one at a time."""

    def __init__(self, model: nn.Module, names):
        self.model, self.names = model, list(names)
        self._streams = [(prefix, m) for prefix, m in model.named_modules() if stream_of(m) is not None]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        weight = self.model.get_submodule(name).weight
        if weight.device.type != "meta":
            return weight
        for prefix, module in self._streams:
            if name == prefix:
                return stream_of(module).read("weight")
            if name.startswith(prefix + "."):
                return stream_of(module).read(name[len(prefix) + 1:] + ".weight")
        raise LuqError(f"{name}'s weight is neither in memory nor in a streamed part of the model")

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


@contextmanager
def parts_on(model: nn.Module, adapter: Adapter, device: torch.device | str, head: bool = True) -> Iterator[None]:
    """The streamed parts outside the decoder layers (embeddings, vision tower, projector and,
    with `head`, the output head) in memory on `device` for the block; nothing for an in-memory model."""
    with ExitStack() as stack:
        modules = input_modules(model, adapter)
        output = model.get_output_embeddings()
        if head and output is not None and stream_of(output) is not None:
            modules.append(output)
        for module in modules:
            stack.enter_context(layer_on(module, device))
        yield


def input_modules(model: nn.Module, adapter: Adapter) -> list[nn.Module]:
    """The streamed modules a forward needs before decoder layer 0 (embeddings, vision tower,
    projector); none for an in-memory model."""
    layers = set(map(id, adapter.decoder_layers(model)))
    head = model.get_output_embeddings()
    return [m for m in model.modules() if stream_of(m) is not None and id(m) not in layers and m is not head]


def layer_digest(layer: nn.Module) -> str:
    """tensor_digest of the layer's weights as the checkpoint has them (streamed layers: read
    once, then remembered)."""
    stream = stream_of(layer)
    if stream is None:
        return tensor_digest(dict(layer.state_dict()))
    if stream.digest is None or stream.sources:
        with layer_on(layer, "cpu"):
            digest = tensor_digest(dict(layer.state_dict()))
        if stream.sources:
            return digest
        stream.digest = digest
    return stream.digest


# ---------------------------------------------------------------------------------
# building the streamed model

_WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]


def weights_dir(source: str) -> Path:
    """The local directory holding MODEL's safetensors: itself, or its hub snapshot."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, allow_patterns=_WEIGHT_PATTERNS))
    except Exception as e:  # offline, unknown repo, no access
        raise LuqError(f"cannot fetch the safetensors of {source!r}: {str(e).splitlines()[0]}") from None


def has_safetensors(source: str) -> bool:
    """Whether MODEL is a local directory with safetensors weights (a hub id: assumed so)."""
    path = Path(source).expanduser()
    if not path.exists():
        return True
    return path.is_dir() and any(path.glob("*.safetensors"))


def checkpoint_names(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """Model tensor name -> checkpoint key, with the renames transformers applies at load."""
    wanted = dict.fromkeys(model.state_dict(keep_vars=True), True)
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:  # transformers 4.x: a regex map on the class
        mapping = getattr(model, "_checkpoint_conversion_mapping", None) or {}
        out = {}
        for key in keys:
            name = key
            for pattern, replacement in mapping.items():
                name, n = re.subn(pattern, replacement, name)
                if n:
                    break
            out[name] = key
        return out
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    out = {}
    for key in keys:
        name, pattern = rename_source_key(key, renamings, converters, getattr(model, "base_model_prefix", None),
                                          wanted)
        if pattern is not None:
            raise LuqError(f"checkpoint tensor {key} needs a conversion ({pattern}) that luq cannot stream; "
                           "load this model in memory (stream=False)")
        out[name] = key
    return out


# the big modules outside the decoder, read only while a stage uses them
_OUTSIDE = ("vision_tower", "visual", "multi_modal_projector")


def _streamed_outside(model: nn.Module) -> dict[str, nn.Module]:
    """State-dict prefix -> module, for the input and output embeddings and a vision tower and projector."""
    wanted = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    return {name + ".": m for name, m in model.named_modules()
            if id(m) in wanted or name.rpartition(".")[2] in _OUTSIDE}


def load_streaming(source: str, config, auto_model, adapter: Adapter, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of `config` with its decoder layers streamed from `source`'s safetensors and
    everything else materialized on `device` at `dtype` (floating tensors)."""
    from accelerate import init_empty_weights

    map_large_allocations()  # a streamed run is one whose memory matters
    files = TensorFiles.in_dir(weights_dir(source))
    if not files.keys():
        raise LuqError(f"{source} has no safetensors weights to stream; load it in memory (stream=False)")
    with init_empty_weights(include_buffers=False):
        build = getattr(auto_model, "from_config", None) or auto_model._from_config  # an Auto class or a model class
        model = build(config, dtype=dtype)
    model.eval()
    names = checkpoint_names(model, files.keys())
    layers = adapter.decoder_layers(model)
    prefixes = [adapter.layer_prefix(i) for i in range(len(layers))]
    in_layers: list[dict[str, str]] = [{} for _ in layers]
    outside = {}
    for name, key in names.items():
        for i, prefix in enumerate(prefixes):
            if name.startswith(prefix):
                in_layers[i][name[len(prefix):]] = key
                break
        else:
            outside[name] = key
    model.tie_weights()
    state = model.state_dict(keep_vars=True)
    streamed = _streamed_outside(model)
    for prefix, module in streamed.items():  # read when a stage uses them, like the layers
        keys = {n: outside.get(prefix + n) for n in module.state_dict()}
        if module is model.get_output_embeddings() and keys.get("weight") is None:  # tied: the embedding's
            tied = [n for n, t in state.items() if t is module.weight and outside.get(n)]
            keys["weight"] = outside[tied[0]] if tied else None
        absent = [n for n, k in keys.items() if k is None]
        if absent:
            raise LuqError(f"{source}: the checkpoint has no tensor for {prefix}{absent[0]}")
        setattr(module, _STREAM, LayerStream(files, keys, dtype))
        prefixes.append(prefix)
    for name, key in outside.items():
        if name in state and not name.startswith(tuple(prefixes)):
            _set_tensor(model, name, files.read(key, dtype).to(device))
    for name, buf in list(model.named_buffers()):
        if buf.device.type != "meta" and not name.startswith(tuple(prefixes)):
            _set_tensor(model, name, buf.to(device))
    missing = [n for n, t in model.state_dict(keep_vars=True).items()
               if t.device.type == "meta" and not n.startswith(tuple(prefixes))]
    if missing:
        raise LuqError(f"{source}: the checkpoint has no tensor for {', '.join(missing[:3])}")
    for i, layer in enumerate(layers):
        absent = [n for n in layer.state_dict(keep_vars=True) if n not in in_layers[i]]
        if absent:
            raise LuqError(f"{source}: the checkpoint has no tensor for {prefixes[i]}{absent[0]}")
        setattr(layer, _STREAM, LayerStream(files, in_layers[i], dtype))
    return model
