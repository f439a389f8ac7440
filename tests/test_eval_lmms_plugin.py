"""The lmms-eval model (luq.eval.lmms_plugin) driven the way lmms-eval drives a simple model."""

from dataclasses import dataclass

import pytest
import torch

from luq.eval.datasets import load_samples
from luq.eval.lmms_plugin import LuqLMM
from luq.eval.runner import AnswerGenerator, load_for_eval
from test_eval_support import tiny_llava_dir


@dataclass
class Request:  # lmms-eval's Instance, as far as a simple model reads it
    args: tuple


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    model, processor, _ = load_for_eval(str(tiny_llava_dir()), "cpu", torch.float32)
    return model, processor


def test_generate_until_answers_in_request_order(tiny):
    model, processor = tiny
    lmm = LuqLMM(model=model, processor=processor, batch_size=2, max_new_tokens=4)
    samples = load_samples("gqa", limit=3)
    docs = [{"image": s.load_image(), "question": s.question} for s in samples]
    lmm.task_dict = {"gqa": {"testdev": docs}}
    to_visual = lambda doc: [doc["image"]]  # noqa: E731
    requests = [Request((s.prompt, {"max_new_tokens": 4, "until": ["\n\n"]} if i != 1 else {"max_new_tokens": 2},
                         to_visual, i, "gqa", "testdev")) for i, s in enumerate(samples)]
    answers = lmm.generate_until(requests)
    expected = AnswerGenerator(model, processor, 4)(samples)  # the runner's own answers
    assert answers[0] == expected[0].split("\n\n")[0].strip() and answers[2] == expected[2].split("\n\n")[0].strip()
    assert len(answers[1].split()) <= 2 and lmm.rank == 0 and lmm.world_size == 1
    with pytest.raises(NotImplementedError):
        lmm.loglikelihood(requests)


def test_lmms_eval_finds_the_luq_model_when_installed():
    registry = pytest.importorskip("lmms_eval.models", reason="lmms-eval (the optional extra) is not installed")
    from importlib.metadata import entry_points

    if not any(ep.name == "luq" for ep in entry_points(group="lmms_eval.models")):
        pytest.skip("luq's entry points are not installed (pip install -e . to refresh them)")
    assert registry.get_model("luq") is LuqLMM
