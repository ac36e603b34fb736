"""MiniMMU's model: a LLaVA-style multimodal LM built from real parts that runs on a CPU.

``MiniLlava`` = a small convolutional vision encoder on 28x28 digits, whose feature map is pooled
to ``num_image_tokens`` visual tokens, a two-layer projector into the language model's embedding
space, and a causal language model (SmolLM2-135M-Instruct in the benchmark; any Hugging Face
``*ForCausalLM`` with ``.model`` and ``.lm_head`` works). The visual tokens replace placeholder
tokens (``image_token_id``) in the input sequence, so positions, labels and SIU's masks are all
indexed by the model's own sequence.

It has the shape :func:`unlearn_ext.siu.train.finetune_llm` expects: ``.model(input_ids=...,
pixel_values=..., attention_mask=...)`` returns ``.last_hidden_state`` and ``.lm_head`` is the
language model's head.

:func:`train_connector` teaches the vision encoder and projector (the language model frozen) to
answer questions about digit images; :func:`greedy_answers` decodes answers (batched, with a key/value cache).
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from unlearn_ext._progress import progress_bar
from unlearn_ext.siu.data import SIUSample
from unlearn_ext.siu.masks import encode_sample
from unlearn_ext.siu.train import collate

__all__ = [
    "DIGIT_WORDS",
    "IMAGE_TOKEN",
    "ConnectorConfig",
    "MiniLlava",
    "build_minimmu",
    "digit_qa",
    "greedy_answer",
    "greedy_answers",
    "train_connector",
]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: The questions about an image, and the answer template ("{word}": the digit's name).
IMAGE_QA: tuple[tuple[str, str], ...] = (
    ("Which digit is this?", "This is the digit {word}."),
    ("What number is shown in the image?", "The image shows the number {word}."),
)


class _VisionEncoder(nn.Module):
    """1x28x28 -> [num_image_tokens, width]: three conv-BN-ReLU blocks (the first two max-pooled,
    28 -> 14 -> 7), then adaptive average pooling to a ``sqrt(tokens)`` square grid, one token per
    cell, so the tokens keep where the strokes are."""

    def __init__(self, width: int, num_image_tokens: int) -> None:
        super().__init__()
        side = int(round(num_image_tokens**0.5))
        if side * side != num_image_tokens:
            raise ValueError(f"num_image_tokens must be a square (1, 4, 9, ...), got {num_image_tokens}")
        c1, c2 = max(width // 2, 1), width
        self.net = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c2, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(side),
        )
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(2).transpose(1, 2)  # [B, tokens, width]


class _Backbone(nn.Module):
    """Vision encoder + projector + the language model's decoder (without its head)."""

    def __init__(self, language_model: nn.Module, image_token_id: int, num_image_tokens: int, width: int) -> None:
        super().__init__()
        hidden = language_model.config.hidden_size
        self.vision = _VisionEncoder(width, num_image_tokens)
        self.projector = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.decoder = language_model.model
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> SimpleNamespace:
        out = self.decoder(inputs_embeds=self.embed(input_ids, pixel_values), attention_mask=attention_mask)
        return SimpleNamespace(last_hidden_state=out.last_hidden_state)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings ``[B, T, hidden]`` of ``input_ids`` ``[B, T]``, the image tokens replaced
        by the visual tokens of ``pixel_values`` ``[I, 1, 28, 28]`` (in order)."""
        embeds = self.decoder.get_input_embeddings()(input_ids)
        is_image = input_ids == self.image_token_id
        n_tokens = int(is_image.sum())
        if pixel_values is None:
            if n_tokens:
                raise ValueError(f"the input has {n_tokens} image tokens but no pixel_values")
        else:
            feats = self.projector(self.vision(pixel_values.to(embeds.dtype)))  # [I, tokens, hidden]
            if feats.shape[0] * feats.shape[1] != n_tokens:
                raise ValueError(
                    f"{feats.shape[0]} images give {feats.shape[0] * feats.shape[1]} visual tokens, "
                    f"but the input has {n_tokens} image tokens"
                )
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1), feats.reshape(-1, feats.shape[-1]).to(embeds.dtype))
        return embeds


class MiniLlava(nn.Module):
    """LLaVA-style model: ``model`` (vision + projector + decoder) and ``lm_head``; see the module doc."""

    def __init__(
        self, language_model: nn.Module, *, image_token_id: int, num_image_tokens: int = 4, width: int = 64
    ) -> None:
        super().__init__()
        vocab = language_model.get_output_embeddings().weight.shape[0]
        if not 0 <= image_token_id < vocab:
            raise ValueError(f"image_token_id {image_token_id} is outside the vocabulary of size {vocab}")
        self.model = _Backbone(language_model, image_token_id, num_image_tokens, width)
        self.lm_head = language_model.lm_head
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens

    def forward(self, input_ids, pixel_values=None, attention_mask=None) -> torch.Tensor:
        """Logits ``[B, T, V]`` (for generation and evaluation; training goes through the fused loss)."""
        return self.lm_head(self.model(input_ids, pixel_values, attention_mask).last_hidden_state)

    def connector_parameters(self) -> list[nn.Parameter]:
        return [*self.model.vision.parameters(), *self.model.projector.parameters()]

    def projector_parameters(self) -> list[nn.Parameter]:
        return list(self.model.projector.parameters())


def digit_qa(label: int, question: int = 0) -> SIUSample:
    """The image question/answer pair number ``question`` for a digit ``label`` (an image sample)."""
    q, a = IMAGE_QA[question % len(IMAGE_QA)]
    return SIUSample(kind=0, prompt=q, answer=a.format(word=DIGIT_WORDS[label]), has_image=True, target_phrase=None)


@dataclass(kw_only=True)
class ConnectorConfig:
    """Training of the vision encoder and projector (the language model frozen), in two stages.

    1. ``pretrain_epochs`` of the vision encoder alone as a digit classifier: a linear head on its
       concatenated visual tokens, every training image, Adam at ``lr``, batches of 64 (seconds).
    2. ``epochs`` over the first ``num_images`` images (two questions each) through the language
       model, Adam at ``lr``, batches of ``batch_size``. Like LLaVA's first stage, only the
       projector trains here unless ``train_vision``; the encoder stays as stage 1 left it.

    Measured with SmolLM2-135M on the 2-core CPU VM: 2.3 s per stage-2 batch of 16. Without stage
    1, 500 stage-2 steps (20 minutes) reached only 68% digit accuracy on test images; the defaults
    take about 10 minutes, inside issue 4's 30-minute build budget
    (``benchmarks/results/minimmu_build.json`` has the measured build time and accuracy)."""

    pretrain_epochs: int = 15
    num_images: int = 1000
    epochs: int = 2
    batch_size: int = 16
    lr: float = 2e-3
    train_vision: bool = False
    seed: int = 0


def train_connector(
    model: MiniLlava,
    tokenizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    config: ConnectorConfig | None = None,
    progress: bool = False,
) -> dict:
    """Train ``model``'s vision encoder and projector in place on digit Q/A; returns a log dict.

    images: ``[N, 1, 28, 28]`` (standardised), labels: ``[N]`` digit ids.
    """
    cfg = config or ConnectorConfig()
    n = min(cfg.num_images, images.shape[0])
    if n < 1:
        raise ValueError("train_connector needs at least one image")
    gen = torch.Generator().manual_seed(cfg.seed)
    pretrain = _pretrain_vision(model, images, labels, cfg, gen) if cfg.pretrain_epochs > 0 else None
    params = model.connector_parameters() if cfg.train_vision else model.projector_parameters()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [
        encode_sample(digit_qa(int(labels[i]), q), tokenizer, image_token_id=model.image_token_id,
                      num_image_tokens=model.num_image_tokens)
        for i in range(n) for q in range(len(IMAGE_QA))
    ]  # fmt: skip
    image_of = [i for i in range(n) for _ in range(len(IMAGE_QA))]
    steps = cfg.epochs * ((len(encoded) + cfg.batch_size - 1) // cfg.batch_size)
    model.eval()  # the frozen parts (language model; the encoder unless train_vision) keep eval mode
    model.model.projector.train()
    if cfg.train_vision:
        model.model.vision.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    with progress_bar(steps, "MiniMMU connector", progress) as advance:
        for _ in range(cfg.epochs):
            order = torch.randperm(len(encoded), generator=gen).tolist()
            for b0 in range(0, len(order), cfg.batch_size):
                idx = order[b0 : b0 + cfg.batch_size]
                batch = collate([encoded[i] for i in idx], pad)
                pixels = images[[image_of[i] for i in idx]]
                logits = model(batch["input_ids"], pixels, batch["attention_mask"])
                loss = F.cross_entropy(
                    logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                advance(1, f"loss {losses[-1]:.3f}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return {
        "steps": len(losses),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "seconds": time.perf_counter() - t0,
        "pretrain_train_accuracy": pretrain,
    }


def _pretrain_vision(model: MiniLlava, images, labels, cfg: ConnectorConfig, gen: torch.Generator) -> float:
    """Train the vision encoder as a digit classifier, with a throw-away linear head on its
    concatenated visual tokens (so the head sees where the strokes are, as the language model
    does); returns the training accuracy of the last epoch."""
    vision = model.model.vision
    head = nn.Linear(vision.width * model.num_image_tokens, int(labels.max()) + 1)
    opt = torch.optim.Adam([*vision.parameters(), *head.parameters()], lr=cfg.lr)
    vision.train()
    correct = 0
    for _ in range(cfg.pretrain_epochs):
        correct = 0
        for idx in torch.randperm(images.shape[0], generator=gen).split(64):
            logits = head(vision(images[idx]).flatten(1))
            loss = F.cross_entropy(logits, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            correct += int((logits.argmax(1) == labels[idx]).sum())
    vision.eval()
    return correct / images.shape[0]


@torch.no_grad()
def greedy_answers(
    model: MiniLlava,
    tokenizer,
    prompts: Sequence[str],
    images: Sequence[torch.Tensor | None],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 32,
) -> list[str]:
    """Greedy decoding of the answers to ``prompts`` (each with its image ``[1, 28, 28]`` or ``None``).

    Prompts whose contexts (image tokens + chat prefix) have the same length and image-ness are
    decoded together, up to ``batch_size`` at a time, so no padding enters the computation; each
    batch runs its context once and then one token per step against the decoder's key/value cache.
    A row stops at the tokenizer's end-of-sequence token or after ``max_new_tokens`` tokens.
    """
    if len(images) != len(prompts):
        raise ValueError(
            f"greedy_answers needs one image (or None) per prompt: {len(prompts)} prompts, {len(images)} images"
        )
    if max_new_tokens < 0 or batch_size < 1:
        raise ValueError(f"need max_new_tokens >= 0 and batch_size >= 1, got {max_new_tokens} and {batch_size}")
    device = model.lm_head.weight.device  # decode where the model is (CPU or GPU)
    contexts = []
    for prompt, image in zip(prompts, images, strict=True):
        sample = SIUSample(kind=0, prompt=prompt, answer="x", has_image=image is not None, target_phrase=None)
        enc = encode_sample(
            sample, tokenizer, image_token_id=model.image_token_id,
            num_image_tokens=model.num_image_tokens if image is not None else 0,
        )  # fmt: skip
        contexts.append(enc.input_ids[enc.labels == -100].tolist())  # image tokens + chat prefix
    groups: dict[tuple[int, bool], list[int]] = {}
    for i, ctx in enumerate(contexts):
        groups.setdefault((len(ctx), images[i] is not None), []).append(i)
    answers: list[str] = [""] * len(prompts)
    for (_, has_image), members in groups.items():
        for start in range(0, len(members), batch_size):
            rows = members[start : start + batch_size]
            ids = torch.tensor([contexts[i] for i in rows], device=device)
            pixels = torch.stack([images[i] for i in rows]).to(device) if has_image else None
            for i, new in zip(rows, _decode(model, ids, pixels, tokenizer.eos_token_id, max_new_tokens), strict=True):
                answers[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
    return answers


def _decode(model: MiniLlava, ids: torch.Tensor, pixels, eos_id: int | None, max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of the equal-length contexts ``ids`` ``[B, T]``, with a key/value cache."""
    new: list[list[int]] = [[] for _ in range(ids.shape[0])]
    done = [False] * ids.shape[0]
    decoder = model.model.decoder
    # Recent transformers (5.24 here) name the key/value cache ``cache``; earlier ones ``past_key_values``.
    name = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    embeds, cache = model.model.embed(ids, pixels), None
    for _ in range(max_new_tokens):
        out = decoder(inputs_embeds=embeds, use_cache=True, **{name: cache})
        cache = getattr(out, name)
        nxt = model.lm_head(out.last_hidden_state[:, -1]).argmax(-1)
        for row, token in enumerate(nxt.tolist()):
            if not done[row]:
                if token == eos_id:
                    done[row] = True
                else:
                    new[row].append(token)
        if all(done):
            break
        embeds = decoder.get_input_embeddings()(nxt[:, None])
    return new


def greedy_answer(
    model: MiniLlava,
    tokenizer,
    prompt: str,
    image: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 16,
) -> str:
    """Greedy decoding of the answer to ``prompt`` (with ``image`` ``[1, 28, 28]`` or without);
    :func:`greedy_answers` for many prompts at once."""
    return greedy_answers(model, tokenizer, [prompt], [image], max_new_tokens=max_new_tokens)[0]


def _build_log(path) -> dict:
    """The training log stored with a cached connector ({} for entries written without one)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    try:
        return {"build_log": json.loads(meta["build_log"])}
    except (KeyError, ValueError):
        return {}


def _connector_state(model: MiniLlava) -> dict[str, torch.Tensor]:
    """The trained part of MiniLlava (vision encoder and projector), flat names, contiguous tensors."""
    parts = {"vision": model.model.vision, "projector": model.model.projector}
    return {f"{p}.{k}": v.detach().contiguous() for p, m in parts.items() for k, v in m.state_dict().items()}


#: The SmolLM2 special token that stands in for the visual tokens (unused by its chat template).
IMAGE_TOKEN = "<empty_output>"


def build_minimmu(
    *,
    config: ConnectorConfig | None = None,
    num_image_tokens: int = 4,
    width: int = 64,
    fresh: bool = False,
    progress: bool = True,
) -> tuple[MiniLlava, object, object, dict]:
    """MiniMMU's model on the bundled data: SmolLM2-135M-Instruct (frozen) + a connector trained on
    the bundled MNIST digits, cached in the user cache after the first build (``fresh`` retrains).

    Returns ``(model, tokenizer, dataset, info)``; ``info`` says whether the connector came from the
    cache and how long its training took.
    """
    from safetensors.torch import load_file, save

    from unlearn_ext._cache import cache_path
    from unlearn_ext.data import load_dataset
    from unlearn_ext.models import load_smollm2, smollm2_gguf_path
    from unlearn_ext.models.checkpoint import atomic_write_bytes

    cfg = config or ConnectorConfig()
    lm, tok = load_smollm2()
    ds = load_dataset("mnist", seed=cfg.seed)
    model = MiniLlava(
        lm, image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN), num_image_tokens=num_image_tokens, width=width
    )
    key = {
        "what": "minimmu-connector",
        "version": 2,
        "config": vars(cfg),
        "num_image_tokens": num_image_tokens,
        "width": width,
        "lm": smollm2_gguf_path().name,
        "lm_bytes": smollm2_gguf_path().stat().st_size,
    }
    path = cache_path("minimmu", key)
    if path.is_file() and not fresh:
        try:
            state = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error type for unreadable files
            raise ValueError(f"{path}: a corrupt or foreign MiniMMU connector (unreadable: {exc})") from exc
        if set(state) != set(_connector_state(model)):
            raise ValueError(f"{path}: a corrupt or foreign MiniMMU connector (its tensors do not match)")
        model.model.vision.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("vision.")})
        model.model.projector.load_state_dict({k[10:]: v for k, v in state.items() if k.startswith("projector.")})
        model.eval()
        return model, tok, ds, {"cached": True, "path": str(path), **_build_log(path)}
    log = train_connector(model, tok, ds.x_train, ds.y_train, config=cfg, progress=progress)
    # The training log travels with the cache entry, so a cached build still reports what it cost.
    meta = {"key": json.dumps(key, default=str), "build_log": json.dumps(log)}
    atomic_write_bytes(path, save(_connector_state(model), metadata=meta))
    return model, tok, ds, {"cached": False, "path": str(path), **log}
