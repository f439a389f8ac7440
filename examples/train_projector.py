"""Train tiny-vlm's projector (and LoRA on a few SmolLM2 linears) on generated VQA data.

    OMP_WAIT_POLICY=PASSIVE python examples/train_projector.py            # the shipped run
    OMP_WAIT_POLICY=PASSIVE python examples/train_projector.py --steps 20 --out /tmp/tv   # smoke

Both pretrained parts stay frozen: DINOv2-small's features of every generated image are
computed once and cached; SmolLM2 runs in fp32 (bfloat16 is ~20x slower on this AVX2 CPU)
with its output layer computed on the answer positions only. Each question about a
training image is a chat of its own (a one-shape scene gives four: colour, shape, position
and a yes/no question); ``--multi-turn`` asks them all in one chat instead, which pays the
64 image tokens once but learned far slower (the v2 run: colour at chance after 400 steps).
Held-out images are asked one question each, as at inference. The projector learns on
standardised features; the standardisation is folded into its first linear when saved,
so the shipped projector is a stock LLaVA one.

Yes/no presence questions ("Is there a red shape?") need the LM to match a word of the
question against the image; a projector alone leaves them at chance, and so did low-rank
deltas (LoRA) on SmolLM2's attention trained on them for 750 steps. Three things together
got them off chance (measured on presence alone: 0.66 after 150 steps, from 0.5):

1. LoRA on the attention projections of SmolLM2 (hand-written, a dozen lines: peft is not
   a luq dependency, and the deltas are merged into the weights at load);
2. presence questions about a description in words ("The image shows a red circle. Is
   there a red shape?"), a few each step: the LoRA learns that match in ~50 steps;
3. an alignment loss on the projector alone (:meth:`Trainee.alignment_loss`), first for
   ``alignment_steps`` steps on its own and then beside the answers' loss: some image
   token must point like the word embedding of every colour and shape drawn, none like
   the absent ones, so the match learned on words finds the image.

Writes to --out: weights.safetensors (the projector + the LoRA factors, refreshed at
every evaluation), train_log.jsonl (loss and held-out accuracy while training) and
accuracy.json (the final held-out accuracy per question kind, next to chance, measured
with the assembled transformers model through its processor and ``generate``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402

from luq.zoo import tinyvlm  # noqa: E402
from luq.errors import LuqError  # noqa: E402
from luq.store import atomic_write, write_json  # noqa: E402

PACKAGE_DATA = Path(__file__).resolve().parents[1] / "src" / "luq" / "data" / "tiny_vlm"


@dataclass(frozen=True)
class TrainConfig:
    out: Path = PACKAGE_DATA
    seed: int = 0
    train_per_kind: int = 800       # generated training images per scene kind (~1 epoch)
    heldout_per_kind: int = 100     # held-out samples per kind (a different random stream)
    steps: int = 950                # ~4 s a step at 2 threads: ~65 minutes
    batch_size: int = 8
    single_turn: bool = True        # one question per sequence (multi-turn chats learned far slower)
    lr: float = 1.5e-3              # projector
    lora_lr: float = 1e-3
    warmup_steps: int = 30
    lora_start: int = 0             # the LoRA deltas start learning at this step (0: with the projector)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    alignment_weight: float = 1.0   # the word-alignment loss (see Trainee.alignment_loss); 0 turns it off
    alignment_batch: int = 32       # images per step in it (the projector alone: cheap)
    alignment_threshold: float = 0.7  # cosine a drawn word's best image token should pass
    alignment_steps: int = 400      # steps of the alignment loss alone before the LM sees images (~1 min)
    text_presence_batch: int = 4    # per step: presence questions about a description in words
    text_presence_per_scene: int = 2  # of those, drawn per shape scene (the pool they are picked from)
    extra_presence: int = 1         # more presence questions per shape scene (drawn apart from the scene)
    eval_every: int = 100
    eval_per_kind: int = 15         # held-out samples per kind in the evaluations while training
    log_every: int = 10
    threads: int = 2
    device: str = "cpu"
    lm_dtype: str = "float32"     # bfloat16 is ~20x slower on this CPU (no native bf16)
    feature_batch: int = 32

    def __post_init__(self) -> None:
        if min(self.train_per_kind, self.heldout_per_kind, self.steps, self.batch_size, self.lora_rank) < 1:
            raise LuqError("sample counts, steps, batch size and LoRA rank must be >= 1")
        if self.eval_per_kind > self.heldout_per_kind:
            raise LuqError("eval_per_kind cannot exceed heldout_per_kind")


# --------------------------------------------------------------------------- LoRA


class LoraLinear(nn.Module):
    """A frozen linear plus a trainable low-rank delta: y = base(x) + scale * x A^T B^T."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        self.scale = scale
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features, generator=generator) / math.sqrt(base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))  # the delta starts at zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = (x.float() @ self.lora_A.T) @ self.lora_B.T
        return self.base(x) + (self.scale * delta).to(x.dtype)


def add_lora(language_model: nn.Module, config: TrainConfig, generator: torch.Generator) -> dict[str, LoraLinear]:
    """Wrap the target linears of every decoder layer; returns them by their weight's full name."""
    wrapped = {}
    for layer_index, layer in enumerate(language_model.layers):
        for parent_name, parent in layer.named_modules():
            for child_name, child in list(parent.named_children()):
                if child_name in config.lora_targets and isinstance(child, nn.Linear):
                    lora = LoraLinear(child, config.lora_rank, config.lora_alpha / config.lora_rank, generator)
                    setattr(parent, child_name, lora)
                    path = f"model.language_model.layers.{layer_index}.{parent_name}.{child_name}.weight"
                    wrapped[path] = lora
    return wrapped


# --------------------------------------------------------------------------- data


@dataclass
class Answer:
    """Where one answer sits in an encoded sequence: tokens [start, end) (the answer + end token)."""

    start: int
    end: int
    kind: str


@dataclass
class Encoded:
    """Generated scenes ready for training: image features and multi-turn token ids."""

    features: torch.Tensor          # float16 [n images, 64, 384]: what the projector reads
    image_index: list[int]          # the image (row of features) of each sequence
    token_ids: list[list[int]]      # chat with the image token expanded: question, answer, question, ...
    answers: list[list[Answer]]     # the supervised spans of each sequence
    chats: list[list[tuple[str, str, str]]]  # (kind, question, answer) in the encoded order
    words_drawn: torch.Tensor       # float [n images, len(ALIGNED_WORDS)]: 1 where that colour/shape is drawn


ALIGNED_WORDS = tuple(tinyvlm.COLOURS) + tinyvlm.SHAPES


def words_drawn(scenes: list[tinyvlm.Scene]) -> torch.Tensor:
    """Which colours and shapes each scene draws (none for the digit and word scenes)."""
    drawn = torch.zeros(len(scenes), len(ALIGNED_WORDS))
    for row, scene in enumerate(scenes):
        for shape, colour in scene.objects:
            drawn[row, ALIGNED_WORDS.index(shape)] = drawn[row, ALIGNED_WORDS.index(colour)] = 1.0
    return drawn


def image_features(model, processor, images, batch: int) -> torch.Tensor:
    """The projector's inputs for each image, exactly as the LLaVA forward selects them."""
    captured = []
    hook = model.model.multi_modal_projector.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    try:
        with torch.no_grad():
            for first in range(0, len(images), batch):
                pixels = processor.image_processor(images[first:first + batch], return_tensors="pt")["pixel_values"]
                model.model.get_image_features(pixel_values=pixels.to(model.device, model.dtype),
                                               vision_feature_layer=model.config.vision_feature_layer,
                                               vision_feature_select_strategy=model.config.vision_feature_select_strategy)
    finally:
        hook.remove()
    return torch.cat(captured).to(torch.float16)


def encode(model, processor, scenes: list[tinyvlm.Scene], config: TrainConfig, cache_key: str) -> Encoded:
    """Tokenize every scene as one chat (its questions in a seeded order, each answered), or
    with ``config.single_turn`` each of its questions as a chat of its own, and compute (or
    reload) the image features."""
    from luq.store import cache_root

    path = cache_root() / f"tiny-vlm-features-{tinyvlm.VERSION}-{cache_key}.pt"
    if path.is_file():
        features = torch.load(path, weights_only=True)
    else:
        features = image_features(model, processor, [s.image for s in scenes], config.feature_batch)
        atomic_write(path, lambda tmp: torch.save(features, tmp))

    def ids(text: str) -> list[int]:
        return processor.tokenizer(text, add_special_tokens=False)["input_ids"]

    generator = torch.Generator().manual_seed(config.seed)
    extra_rng = np.random.default_rng(config.seed + 7)  # apart from the scenes' stream
    all_ids, all_answers, chats, image_index = [], [], [], []
    for index, scene in enumerate(scenes):
        order = torch.randperm(len(scene.questions), generator=generator).tolist()
        chats_of_scene = [[scene.questions[i]] for i in order] if config.single_turn else \
            [[scene.questions[i] for i in order]]
        if config.single_turn and scene.objects:
            chats_of_scene += [[("presence", *tinyvlm.presence_question(extra_rng, list(scene.objects)))]
                               for _ in range(config.extra_presence)]
        for questions in chats_of_scene:
            tokens, spans = _encode_chat(processor, questions, ids)
            all_ids.append(tokens)
            all_answers.append(spans)
            chats.append(questions)
            image_index.append(index)
    return Encoded(features=features, image_index=image_index, token_ids=all_ids, answers=all_answers, chats=chats,
                   words_drawn=words_drawn(scenes))


def _encode_chat(processor, questions: list[tuple[str, str, str]], ids) -> tuple[list[int], list[Answer]]:
    """Token ids of one chat about an image (the image token expanded) and its answer spans."""
    tokenizer = processor.tokenizer
    expanded = tinyvlm.IMAGE_TOKEN * tinyvlm.num_image_tokens()
    tokens = ids(tinyvlm.chat_prompt(processor, questions[0][1]).replace(tinyvlm.IMAGE_TOKEN, expanded))
    spans = []
    for turn, (kind, _, answer) in enumerate(questions):
        answer_ids = ids(answer + tokenizer.eos_token)
        spans.append(Answer(len(tokens), len(tokens) + len(answer_ids), kind))
        tokens += answer_ids
        if turn + 1 < len(questions):  # the chat template's next user turn
            tokens += ids(f"\n<|im_start|>user\n{questions[turn + 1][1]}<|im_end|>\n<|im_start|>assistant\n")
    return tokens, spans


def describe(objects: tuple[tuple[str, str], ...]) -> str:
    """'The image shows a red circle, a blue square and a green triangle.'"""
    things = [f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}" for shape, colour in objects]
    listed = things[0] if len(things) == 1 else ", ".join(things[:-1]) + " and " + things[-1]
    return f"The image shows {listed}."


def text_presence(processor, scenes: list[tinyvlm.Scene], per_scene: int, seed: int) -> list[tuple[list[int], int]]:
    """(prompt ids, answer token) of presence questions about each shape scene described in words."""
    rng = np.random.default_rng(seed)
    pool = []
    for scene in scenes:
        for _ in range(per_scene if scene.objects else 0):
            question, answer = tinyvlm.presence_question(rng, list(scene.objects))
            prompt = processor.apply_chat_template([{"role": "user", "content": f"{describe(scene.objects)} {question}"}],
                                                   add_generation_prompt=True)
            pool.append((processor.tokenizer(prompt, add_special_tokens=False)["input_ids"],
                         processor.tokenizer(answer, add_special_tokens=False)["input_ids"][0]))
    return pool


def check_tokenization(processor, scene: tinyvlm.Scene, data: Encoded, index: int) -> None:
    """The training chat must be what the processor makes of the same chat and image."""
    chat = data.chats[index]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": chat[0][1]}]}]
    for turn, (_, _, answer) in enumerate(chat):
        if turn:
            messages.append({"role": "user", "content": [{"type": "text", "text": chat[turn][1]}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    text = processor.apply_chat_template(messages)
    reference = processor(text=text, images=scene.image, return_tensors="pt")["input_ids"][0].tolist()
    if reference[:len(data.token_ids[index])] != data.token_ids[index]:
        raise LuqError("training tokenization differs from the processor's; fix encode()")


# --------------------------------------------------------------------------- the model pieces in training


class Trainee:
    """The frozen LM (in lm_dtype), the trainable projector and the LoRA factors."""

    def __init__(self, model, processor, config: TrainConfig, feature_mean: torch.Tensor, feature_std: torch.Tensor) -> None:
        lm_dtype = getattr(torch, config.lm_dtype)
        self.language_model = model.model.language_model.to(config.device, lm_dtype)
        self.projector = model.model.multi_modal_projector.to(config.device, torch.float32)
        self.output_weight = model.lm_head.weight.detach().to(config.device, torch.float32)
        self.word_embeddings = self.output_weight[word_token_ids(processor)]  # tied: = input embeddings
        self.alignment_threshold = config.alignment_threshold
        self.image_token_id = model.config.image_token_id
        self.eos_id = model.generation_config.eos_token_id
        self.pad_id = model.generation_config.pad_token_id
        self.device = torch.device(config.device)
        self.feature_mean = feature_mean.to(self.device)
        self.feature_std = feature_std.to(self.device)
        for p in self.language_model.parameters():
            p.requires_grad_(False)
        generator = torch.Generator().manual_seed(config.seed)
        self.loras = add_lora(self.language_model, config, generator)
        self.language_model.to(config.device)

    def parameter_groups(self, config: TrainConfig) -> list[dict]:
        lora_params = [p for lora in self.loras.values() for p in (lora.lora_A, lora.lora_B)]
        return [{"params": list(self.projector.parameters()), "lr": config.lr},
                {"params": lora_params, "lr": config.lora_lr}]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector((features.float() - self.feature_mean) / self.feature_std)

    def alignment_loss(self, features: torch.Tensor, drawn: torch.Tensor) -> torch.Tensor:
        """Some image token of each image should point like the embedding of each colour and
        shape word drawn in it (cosine above the threshold), and none like the absent ones.

        Without it, presence questions ("Is there a red shape?") stayed at chance: a LoRA
        learns to match a question word against a description in words in 50 steps (see
        :func:`text_presence`), but nothing made image tokens look like words to that match.
        """
        tokens = nn.functional.normalize(self.project(features), dim=-1)            # [B, 64, d]
        words = nn.functional.normalize(self.word_embeddings, dim=-1)                # [W, d]
        best = (tokens @ words.T).amax(1)                                            # [B, W]
        return nn.functional.binary_cross_entropy_with_logits((best - self.alignment_threshold) * 20, drawn)

    def text_presence_loss(self, examples: list[tuple[list[int], int]]) -> torch.Tensor:
        """Cross-entropy of the yes/no answer to presence questions about a description in words."""
        ids, mask = self._padded([seq for seq, _ in examples], left=True)  # the answer follows the last position
        hidden = self.language_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[:, -1]
        answers = torch.tensor([answer for _, answer in examples], device=self.device)
        return nn.functional.cross_entropy(self.logits(hidden), answers)

    def hidden_states(self, ids: torch.Tensor, mask: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Last hidden states of the LM with the projected image features at the image tokens."""
        embeds = self.language_model.embed_tokens(ids)
        image_embeds = self.project(features).to(embeds.dtype)
        image_positions = ids == self.image_token_id
        embeds = embeds.masked_scatter(image_positions[..., None], image_embeds.reshape(-1, embeds.shape[-1]))
        return self.language_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.float() @ self.output_weight.T  # fp32: in bf16 "yes"/"no" often tie

    def loss(self, data: Encoded, indices: list[int]) -> torch.Tensor:
        """Cross-entropy of every answer token (and its end token) given the chat before it."""
        seqs = [data.token_ids[i] for i in indices]
        ids, mask = self._padded(seqs)
        targets = torch.full(ids.shape, -100, dtype=torch.long)
        for row, i in enumerate(indices):
            for span in data.answers[i]:
                targets[row, span.start:span.end] = torch.tensor(seqs[row][span.start:span.end])
        targets = targets.to(self.device)
        hidden = self.hidden_states(ids, mask, data.features[[data.image_index[i] for i in indices]].to(self.device))
        predicting = targets[:, 1:] != -100  # hidden state t predicts token t + 1
        logits = self.logits(hidden[:, :-1][predicting])
        return nn.functional.cross_entropy(logits, targets[:, 1:][predicting])

    @torch.no_grad()
    def exact_match(self, data: Encoded, indices: list[int]) -> list[tuple[str, bool]]:
        """(kind, hit) per answer: whether greedy decoding would give exactly the answer and its end token.

        One teacher-forced forward: greedy decoding reproduces the reference tokens if and
        only if each of them is the argmax given the ones before it.
        """
        seqs = [data.token_ids[i] for i in indices]
        ids, mask = self._padded(seqs)
        predicted = self.logits(self.hidden_states(ids, mask, data.features[[data.image_index[i] for i in indices]].to(self.device))).argmax(-1)
        hits = []
        for row, i in enumerate(indices):
            for span in data.answers[i]:
                hit = predicted[row, span.start - 1:span.end - 1].tolist() == seqs[row][span.start:span.end]
                hits.append((span.kind, hit))
        return hits

    def _padded(self, seqs: list[list[int]], left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            where = slice(width - len(seq), width) if left else slice(0, len(seq))
            ids[row, where] = torch.tensor(seq)
            mask[row, where] = 1
        return ids.to(self.device), mask.to(self.device)

    def export(self) -> dict[str, torch.Tensor]:
        """The shipped tensors: the projector with the standardisation folded in, the LoRA factors."""
        weight_1 = self.projector.linear_1.weight.detach().float() / self.feature_std[None, :]
        bias_1 = self.projector.linear_1.bias.detach().float() - weight_1 @ self.feature_mean
        tensors = {
            "model.multi_modal_projector.linear_1.weight": weight_1,
            "model.multi_modal_projector.linear_1.bias": bias_1,
            "model.multi_modal_projector.linear_2.weight": self.projector.linear_2.weight.detach().float(),
            "model.multi_modal_projector.linear_2.bias": self.projector.linear_2.bias.detach().float(),
        }
        for name, lora in self.loras.items():
            tensors[tinyvlm.lora_key(name, "A")] = lora.lora_A.detach().float()
            tensors[tinyvlm.lora_key(name, "B")] = lora.lora_B.detach().float()
        return {k: v.contiguous().cpu() for k, v in tensors.items()}


def word_token_ids(processor) -> list[int]:
    """The token of each aligned word as it appears mid-sentence (' red'): one token each."""
    ids = [processor.tokenizer(" " + word, add_special_tokens=False)["input_ids"] for word in ALIGNED_WORDS]
    if any(len(i) != 1 for i in ids):
        raise LuqError("every aligned colour/shape word must be one token")
    return [i[0] for i in ids]


def accuracy_by_kind(kinds: list[str], predictions: list[str], answers: list[str]) -> dict[str, float]:
    by_kind: dict[str, list[bool]] = {}
    for kind, pred, ans in zip(kinds, predictions, answers):
        by_kind.setdefault(kind, []).append(tinyvlm.is_correct(pred, ans))
    return {kind: round(sum(hits) / len(hits), 4) for kind, hits in by_kind.items()}


# --------------------------------------------------------------------------- the run


def same_length_batches(data: Encoded, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """One epoch of batches in a random order, each of sequences with the same number of
    answers (so of about the same length: little padding)."""
    by_answers: dict[int, list[int]] = {}
    for i, answers in enumerate(data.answers):
        by_answers.setdefault(len(answers), []).append(i)
    batches = []
    for indices in by_answers.values():
        shuffled = [indices[j] for j in torch.randperm(len(indices), generator=generator).tolist()]
        batches += [shuffled[k:k + batch_size] for k in range(0, len(shuffled), batch_size)]
    return [batches[j] for j in torch.randperm(len(batches), generator=generator).tolist()]


def learning_rate_factor(step: int, config: TrainConfig, start: int = 0) -> float:
    """Zero before ``start``, then a linear warm-up, then cosine decay to 10%."""
    if step < start:
        return 0.0
    if step < start + config.warmup_steps:
        return (step - start + 1) / config.warmup_steps
    progress = (step - start - config.warmup_steps) / max(1, config.steps - start - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def save_weights(trainee: Trainee, config: TrainConfig, step: int) -> Path:
    path = config.out / tinyvlm.WEIGHTS_FILE
    metadata = {"version": tinyvlm.VERSION, "lora_scale": str(config.lora_alpha / config.lora_rank),
                "step": str(step), "train_config": json.dumps(asdict(config), default=str)}
    atomic_write(path, lambda tmp: save_file(trainee.export(), str(tmp), metadata=metadata))
    return path


def train(config: TrainConfig) -> dict:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    config.out.mkdir(parents=True, exist_ok=True)
    log_path = config.out / "train_log.jsonl"
    log_path.write_text("")
    started = time.time()

    def log(record: dict) -> None:
        record = {"elapsed_s": round(time.time() - started, 1), **record}
        with log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)

    base = tinyvlm.base_dir()
    model = LlavaForConditionalGeneration.from_pretrained(base, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(base)

    # training: scenes asked all their questions in one chat; held out: one question per image,
    # as at inference, from a different random stream
    train_scenes = tinyvlm.make_scenes(config.train_per_kind, seed=config.seed)
    heldout_samples = tinyvlm.make_samples(config.heldout_per_kind, seed=config.seed + 1_000_003)
    heldout_scenes = [tinyvlm.Scene(s.image, [(s.kind, s.question, s.answer)]) for s in heldout_samples]
    log({"event": "generated", "train_images": len(train_scenes),
         "train_questions": sum(len(s.questions) for s in train_scenes), "heldout": len(heldout_samples)})
    key = hashlib.sha256(json.dumps([tinyvlm.VERSION, config.seed, config.train_per_kind, config.heldout_per_kind])
                         .encode()).hexdigest()[:10]
    train_data = encode(model, processor, train_scenes, config, f"train-{key}")
    heldout_data = encode(model, processor, heldout_scenes, config, f"heldout-{key}")
    check_tokenization(processor, train_scenes[0], train_data, 0)
    log({"event": "features", "shape": list(train_data.features.shape), "train_chats": len(train_data.token_ids)})

    flat = train_data.features.float().reshape(-1, train_data.features.shape[-1])
    trainee = Trainee(model, processor, config, flat.mean(0), flat.std(0).clamp_min(1e-3))
    del flat
    optimizer = torch.optim.AdamW(trainee.parameter_groups(config), weight_decay=0.0)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    generator = torch.Generator().manual_seed(config.seed)
    batches: list[list[int]] = []
    heldout_kinds = [s.kind for s in heldout_samples]
    eval_indices = [i for kind in tinyvlm.QUESTION_KINDS
                    for i in [j for j, k in enumerate(heldout_kinds) if k == kind][:config.eval_per_kind]]

    def evaluate(step: int) -> None:
        hits: dict[str, list[bool]] = {}
        for first in range(0, len(eval_indices), config.batch_size):
            for kind, hit in trainee.exact_match(heldout_data, eval_indices[first:first + config.batch_size]):
                hits.setdefault(kind, []).append(hit)
        accuracy = {kind: round(sum(h) / len(h), 4) for kind, h in hits.items()}
        log({"event": "eval", "step": step, "heldout_accuracy": accuracy})
        save_weights(trainee, config, step)

    def alignment(images: torch.Tensor) -> torch.Tensor:
        return trainee.alignment_loss(train_data.features[images].to(trainee.device),
                                      train_data.words_drawn[images].to(trainee.device))

    # first the projector alone learns to make word-like image tokens (seconds a step: no LM)
    projector_optimizer = torch.optim.AdamW(trainee.projector.parameters(), lr=config.lr, weight_decay=0.0)
    for step in range(config.alignment_steps if config.alignment_weight else 0):
        for group in projector_optimizer.param_groups:
            group["lr"] = config.lr * min(1.0, (step + 1) / config.warmup_steps)
        loss = alignment(torch.randint(len(train_data.features), (2 * config.alignment_batch,), generator=generator))
        projector_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        projector_optimizer.step()
        if (step + 1) % 100 == 0:
            log({"event": "align", "step": step + 1, "alignment_loss": round(loss.item(), 4)})
    del projector_optimizer

    text_pool = (text_presence(processor, train_scenes, config.text_presence_per_scene, config.seed + 11)
                 if config.text_presence_batch else [])
    running = {"loss": 0.0, "alignment": 0.0, "text_presence": 0.0}
    for step in range(config.steps):
        if not batches:
            batches = same_length_batches(train_data, config.batch_size, generator)
        batch = batches.pop()
        for group, base_lr, start in zip(optimizer.param_groups, base_lrs, (0, config.lora_start)):
            group["lr"] = base_lr * learning_rate_factor(step, config, start)
        answer_loss = trainee.loss(train_data, batch)
        loss = answer_loss
        running["loss"] += answer_loss.item()
        if config.alignment_weight:
            term = alignment(torch.randint(len(train_data.features), (config.alignment_batch,), generator=generator))
            loss = loss + config.alignment_weight * term
            running["alignment"] += term.item()
        if text_pool:
            picks = torch.randint(len(text_pool), (config.text_presence_batch,), generator=generator).tolist()
            term = trainee.text_presence_loss([text_pool[i] for i in picks])
            loss = loss + term
            running["text_presence"] += term.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % config.log_every == 0:
            log({"event": "train", "step": step + 1,
                 **{name: round(total / config.log_every, 4) for name, total in running.items()},
                 "lr": round(optimizer.param_groups[0]["lr"], 6)})
            running = dict.fromkeys(running, 0.0)
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            evaluate(step + 1)
    train_seconds = time.time() - started

    # the final word: the assembled transformers model, through its processor and generate()
    final, final_processor = tinyvlm.load_tiny_vlm(device=config.device, weights=config.out / tinyvlm.WEIGHTS_FILE)
    predictions = tinyvlm.answer_questions(final, final_processor, [s.image for s in heldout_samples],
                                           [s.question for s in heldout_samples])
    references = [s.answer for s in heldout_samples]
    accuracy = accuracy_by_kind(heldout_kinds, predictions, references)
    result = {
        "heldout_per_kind": config.heldout_per_kind,
        "accuracy": accuracy,
        "chance": {kind: round(tinyvlm.chance_level(kind), 4) for kind in accuracy},
        "overall": round(sum(tinyvlm.is_correct(p, a) for p, a in zip(predictions, references))
                         / len(predictions), 4),
        "train_seconds": round(train_seconds, 1),  # data, features and training, before this evaluation
        "eval_seconds": round(time.time() - started - train_seconds, 1),
        "threads": config.threads,
        "examples": [{"kind": s.kind, "question": s.question, "answer": s.answer, "prediction": p}
                     for s, p in list(zip(heldout_samples, predictions))[:14]],
        "config": json.loads(json.dumps(asdict(config), default=str)),
    }
    write_json(config.out / "accuracy.json", result)
    log({"event": "final", "heldout_accuracy": accuracy, "train_seconds": round(train_seconds, 1)})
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = TrainConfig()
    parser.add_argument("--out", type=Path, default=defaults.out)
    for name in ("seed", "train_per_kind", "heldout_per_kind", "steps", "batch_size", "eval_every",
                 "eval_per_kind", "log_every", "threads", "lora_rank", "alignment_steps",
                 "text_presence_batch", "extra_presence"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("lr", "lora_lr", "alignment_weight", "alignment_threshold"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    parser.add_argument("--multi-turn", dest="single_turn", action="store_false",
                        help="ask all the questions of an image in one chat")
    parser.add_argument("--lora-start", type=int, default=defaults.lora_start)
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--lm-dtype", default=defaults.lm_dtype, choices=("float32", "bfloat16"))
    args = parser.parse_args(argv)
    try:
        train(TrainConfig(**vars(args)))
    except LuqError as e:
        raise SystemExit(f"train_projector: error: {e}") from None


if __name__ == "__main__":
    main()
