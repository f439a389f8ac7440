"""Layer-0 capture + one-layer-at-a-time forward reproduces the model's own hidden states."""

import pytest
import torch

from luq import LuqError
from luq.capture import capture_first_layer_inputs, run_layerwise
from luq.models import adapter_for, quantizable_linears
from tiny_models import llava_inputs, qwen_inputs, tiny_llava, tiny_qwen25vl

CASES = {"llava": (tiny_llava, llava_inputs), "qwen2.5-vl": (tiny_qwen25vl, qwen_inputs)}


@pytest.mark.parametrize("with_image", [True, False])
@pytest.mark.parametrize("family", sorted(CASES))
def test_layerwise_forward_reproduces_hidden_states(family, with_image):
    make_model, make_inputs = CASES[family]
    model = make_model()
    adapter = adapter_for(model)
    assert adapter.family == family
    batches = [make_inputs(model, with_image=with_image, seed=s) for s in (0, 1)]
    with torch.no_grad():
        expected = [model(**inputs, output_hidden_states=True).hidden_states for inputs, _ in batches]
    first = capture_first_layer_inputs(model, adapter, batches)
    for b, inp in enumerate(first):
        assert torch.equal(inp.hidden, expected[b][0])
    layers = adapter.decoder_layers(model)
    n = len(layers)
    for i, _, outputs, _ in run_layerwise(layers, first, device="cpu"):
        for b, out in enumerate(outputs):
            if i + 1 < n:  # the model's last hidden state is after the final norm
                torch.testing.assert_close(out, expected[b][i + 1], rtol=0, atol=0)
            else:
                decoder = adapter.decoder(model)
                torch.testing.assert_close(decoder.norm(out), expected[b][n], rtol=0, atol=0)


def test_token_kinds_are_kept():
    model = tiny_llava()
    batch = llava_inputs(model)
    (inp,) = capture_first_layer_inputs(model, adapter_for(model), [batch])
    assert torch.equal(inp.token_kind, batch[1])


def test_hook_point_sees_every_linear():
    model = tiny_llava()
    adapter = adapter_for(model)
    first = capture_first_layer_inputs(model, adapter, [llava_inputs(model)])
    seen = []

    def attach(i, layer):
        return [m.register_forward_pre_hook(lambda mod, args, name=name: seen.append((i, name)))
                for name, m in quantizable_linears(layer).items()]

    for i, _, _, handles in run_layerwise(adapter.decoder_layers(model), first, "cpu", before_layer=attach):
        for h in handles:
            h.remove()
    names = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert {n for i, n in seen if i == 2} == names
    assert len(seen) == 3 * 7


def test_unknown_family_is_one_clear_error():
    with pytest.raises(LuqError, match="unsupported model family 'bert'; supported: .*llama"):
        adapter_for("bert")


def test_consumer_can_replace_the_outputs_the_next_layer_reads():
    model = tiny_llava()
    adapter = adapter_for(model)
    first = capture_first_layer_inputs(model, adapter, [llava_inputs(model)])
    layers = adapter.decoder_layers(model)
    seen_inputs = []
    layers[1].register_forward_pre_hook(lambda m, args: seen_inputs.append(args[0].clone()))
    for i, _, outputs, _ in run_layerwise(layers, first, "cpu"):
        if i == 0:
            outputs[0] = outputs[0] * 0 + 1.5  # e.g. the outputs of the quantized layer
    assert torch.equal(seen_inputs[0], torch.full_like(seen_inputs[0], 1.5))


def test_activations_on_disk_give_the_same_outputs(tmp_path):
    from luq.capture import DiskActivations

    model = tiny_llava()
    adapter = adapter_for(model)
    batches = [llava_inputs(model, seed=s) for s in (0, 1)]
    in_memory = capture_first_layer_inputs(model, adapter, batches)
    disk = DiskActivations(tmp_path)
    on_disk = capture_first_layer_inputs(model, adapter, batches, disk=disk)
    layers = adapter.decoder_layers(model)
    for (i, _, expected, _), (j, _, got, _) in zip(run_layerwise(layers, in_memory, "cpu"),
                                                   run_layerwise(layers, on_disk, "cpu", disk=disk)):
        assert i == j and all(torch.equal(a, b) for a, b in zip(expected, got))
    assert list(tmp_path.iterdir()) == []  # files are unlinked once mapped: nothing left behind
