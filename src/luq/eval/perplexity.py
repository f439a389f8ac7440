"""Perplexity of a causal LM (or of the language model inside a vision-language model) on text.

The corpus is tokenized once (no special tokens) and read in windows of ``seq_len`` tokens
starting every ``stride`` tokens. A token is scored in the first window that holds it with
at least one token before it, and only there. With ``stride < seq_len`` every token after
the corpus's first is scored once, with at least ``seq_len - stride`` tokens of context;
with ``stride == seq_len`` (the default; the GPTQ-paper convention) the windows are
disjoint and each window's first token is context only. Perplexity =
exp(sum of token NLLs / number of scored tokens), the sum taken exactly (``math.fsum``).

A vision-language model is run on ``input_ids`` alone (no image), which is its language model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from luq.errors import LuqError
from luq.eval.distributed import DataParallel, batched, run_sharded
from luq.eval.metrics import perplexity

HUB_CORPORA = {"wikitext2": ("wikitext", "wikitext-2-raw-v1", "test", "text")}


@dataclass(frozen=True)
class PerplexityConfig:
    """data: a text file, a folder of .txt files, "wikitext2" (its test split) or a hub
    dataset with a 'text' column; None: the offline Wikipedia excerpt. seq_len: tokens per
    window (capped at the model's context). stride: tokens between window starts (None:
    seq_len). limit: evaluate at most this many windows. batch_size: windows per forward."""

    data: str | None = None
    seq_len: int = 2048
    stride: int | None = None
    limit: int | None = None
    batch_size: int = 1

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise LuqError(f"--seq-len must be at least 2, got {self.seq_len}")
        if self.stride is not None and not 1 <= self.stride <= self.seq_len:
            raise LuqError(f"--stride must be between 1 and --seq-len ({self.seq_len}), got {self.stride}")
        if self.limit is not None and self.limit < 1:
            raise LuqError(f"--limit must be at least 1, got {self.limit}")
        if self.batch_size < 1:
            raise LuqError(f"--batch-size must be at least 1, got {self.batch_size}")


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) go in; tokens [first_target, end) are scored."""

    begin: int
    end: int
    first_target: int


def windows(n_tokens: int, seq_len: int, stride: int) -> list[Window]:
    """The windows over ``n_tokens`` tokens (see the module docstring for what each scores)."""
    out: list[Window] = []
    scored_up_to = 1  # token 0 is never predicted
    begin = 0
    while scored_up_to < n_tokens:
        end = min(begin + seq_len, n_tokens)
        out.append(Window(begin, end, max(scored_up_to, begin + 1)))
        scored_up_to = end
        begin += stride
    return out


def corpus_text(source: str | None) -> str:
    """The text of a perplexity corpus (see ``PerplexityConfig.data``)."""
    if source in HUB_CORPORA:
        path, name, split, column = HUB_CORPORA[source]
        try:
            import datasets

            rows = datasets.load_dataset(path, name, split=split)
        except Exception as e:
            raise LuqError(f"could not load {source} from the hub ({type(e).__name__}); "
                           "give a local text file or folder with --data") from None
        return "\n\n".join(rows[column])  # the convention of the GPTQ/AWQ evaluations
    from luq.calibration import load_text

    return load_text(source)


def _max_positions(model: torch.nn.Module) -> int | None:
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, "max_position_embeddings", None)


@torch.inference_mode()
def _window_nlls(model: torch.nn.Module, token_ids: torch.Tensor, batch: Sequence[Window]) -> list[tuple[float, int]]:
    """(sum of NLLs in nats, tokens scored) of each window of a batch of equal-length windows."""
    device = next(model.parameters()).device
    ids = torch.stack([token_ids[w.begin:w.end] for w in batch]).to(device)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    return _nlls(logits, ids, batch)


def _nlls(logits: torch.Tensor, ids: torch.Tensor, batch: Sequence[Window]) -> list[tuple[float, int]]:
    out = []
    for row, w in enumerate(batch):
        first = w.first_target - w.begin  # position of the first scored token in the window
        predicted = logits[row, first - 1:-1].float()
        targets = ids[row, first:]
        out.append((F.cross_entropy(predicted, targets, reduction="sum").item(), targets.numel()))
    return out


def token_window_perplexity(model: torch.nn.Module, token_windows: torch.Tensor, batch_size: int = 4) -> float:
    """Perplexity over ready-made windows of token ids [n, L], each window's first token
    context only (the same scoring as disjoint corpus windows)."""
    n, seq_len = token_windows.shape
    flat = token_windows.reshape(-1)
    spans = [Window(i * seq_len, (i + 1) * seq_len, i * seq_len + 1) for i in range(n)]
    groups = [spans[i:i + batch_size] for i in range(0, n, batch_size)]
    from luq.models.streaming import is_streamed

    if is_streamed(model):  # its decoder layers are on disk: all windows through one layer at a time
        from luq.capture import TEXT, layerwise_logits
        from luq.models import adapter_for

        ids = [torch.stack([flat[w.begin:w.end] for w in batch]) for batch in groups]
        batches = [({"input_ids": i, "attention_mask": torch.ones_like(i)}, torch.full_like(i, TEXT)) for i in ids]
        logits = layerwise_logits(model, adapter_for(model), batches)
        nlls = [r for batch, i, z in zip(groups, ids, logits) for r in _nlls(z, i.to(z.device), batch)]
    else:
        nlls = [r for batch in groups for r in _window_nlls(model, flat, batch)]
    return perplexity(math.fsum(nll for nll, _ in nlls), sum(count for _, count in nlls))


def evaluate_perplexity(model: torch.nn.Module, tokenizer, config: PerplexityConfig, text: str | None = None,
                        parallel: DataParallel | None = None,
                        progress: Callable[[int, int], None] | None = None) -> dict:
    """Perplexity of ``model`` on ``text`` (default: ``config.data``'s corpus). Returns
    perplexity, nll (mean per token), tokens, windows, seq_len, stride, seconds."""
    parallel = parallel or DataParallel()
    start = time.perf_counter()
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a multimodal processor carries one
    text = corpus_text(config.data) if text is None else text
    token_ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if token_ids.numel() < 2:
        raise LuqError("the perplexity corpus holds fewer than 2 tokens")
    seq_len = config.seq_len
    limit_positions = _max_positions(model)
    if limit_positions:
        seq_len = min(seq_len, limit_positions)
    stride = min(config.stride or seq_len, seq_len)
    chosen = windows(token_ids.numel(), seq_len, stride)[:config.limit]
    # batch only windows of one length (the last one may be shorter)
    batches = [b for length in dict.fromkeys(w.end - w.begin for w in chosen)
               for b in batched([w for w in chosen if w.end - w.begin == length], config.batch_size)]
    done = [0]
    n_mine = len(parallel.my_batches(len(batches)))

    def compute(batch: list[Window]) -> list[tuple[float, int]]:
        out = _window_nlls(model, token_ids, batch)
        done[0] += 1
        if progress:
            progress(done[0], n_mine)
        return out

    per_window = run_sharded(batches, compute, parallel)
    nll_sum = math.fsum(nll for nll, _ in per_window)
    n_scored = sum(n for _, n in per_window)
    return {"perplexity": perplexity(nll_sum, n_scored), "nll": nll_sum / n_scored, "tokens": n_scored,
            "windows": len(chosen), "seq_len": seq_len, "stride": stride, "corpus_tokens": int(token_ids.numel()),
            "config": asdict(config), "seconds": round(time.perf_counter() - start, 3),
            "world_size": parallel.world_size}

