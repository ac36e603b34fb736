"""The multimodal side of ``unlearn apply``: a concept request (forget a visual concept shown in one
image) on a checkpoint written by :func:`unlearn_ext.siu.checkpoint.save_multimodal_checkpoint`.

The job loads the model and its tokenizer from the one file, reads every image the request names
(recording each file's sha256 in the audit: the proof of what was forgotten), fills the request's
text from the checkpoint's ``concept_defaults`` and :class:`unlearn_ext.siu.ConceptRequest`'s own
defaults, runs :func:`unlearn_ext.siu.unlearn_concept`, and measures (fractions in [0, 1]):

* ``forget_hit_rate``: the share of the identity prompts whose greedy answer about the forget image
  names the concept (case-insensitive substring, MMUBench's efficacy = 1 - it);
* ``held_out_hit_rate``: the same with the first identity prompt on each of ``checks.held_out_images``
  (generality);
* ``retain_acc``: the share of ``checks.retain`` questions (with their image, or text only) answered
  with an expected word as a whole word (specificity).

The greedy answers to the identity prompts on the forget image, before and after, go to the audit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unlearn_ext.production.classifier import check_expected_config, gate_results, same_state
from unlearn_ext.production.request import MergedRequest, RequestError, canonical_digest


def _finetune_config(method: str, hparams: dict, seed: int):
    """The request's :class:`FinetuneConfig`, each value checked against the field's default type."""
    from unlearn_ext.siu.train import FinetuneConfig

    fields = {f.name: f for f in dataclasses.fields(FinetuneConfig)}
    kw: dict[str, Any] = {}
    for k, v in hparams.items():
        default = fields[k].default
        if k == "lora_targets":
            if not isinstance(v, list) or not v or not all(isinstance(t, str) and t for t in v):
                raise RequestError(f"hparams.lora_targets must be a non-empty list of module names, got {v!r}")
            v = tuple(v)
        elif k in ("lora_rank", "lora_alpha") and v is None:
            pass
        elif isinstance(default, bool) or k == "renormalize":
            if not isinstance(v, bool):
                raise RequestError(f"hparams.{k} must be true or false, got {v!r}")
        elif isinstance(default, int) or k == "lora_rank":
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise RequestError(f"hparams.{k} must be a positive integer, got {v!r}")
        elif isinstance(default, float) or k == "lora_alpha":
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise RequestError(f"hparams.{k} must be a finite number, got {v!r}")
            v = float(v)
            if k in ("lr", "temperature") and v <= 0:
                raise RequestError(f"hparams.{k} must be positive, got {v!r}")
        elif not isinstance(v, str):
            raise RequestError(f"hparams.{k} must be a string, got {v!r}")
        kw[k] = v
    from unlearn_ext.ops._common import BACKENDS

    if kw.get("backend", "auto") not in BACKENDS:
        raise RequestError(f"hparams.backend must be one of {list(BACKENDS)}, got {kw['backend']!r}")
    return FinetuneConfig(objective=method, seed=seed, **kw)


def _read_image(path: str, record: dict, what: str) -> tuple[torch.Tensor, str]:
    """``(pixel_values [C, H, W], sha256 of the file)``."""
    from unlearn_ext.siu.checkpoint import load_image

    try:
        data = Path(path).read_bytes()  # read once: the digest is of the bytes decoded
        x = load_image(path, record, data=data)
    except FileNotFoundError as e:
        raise RequestError(f"{what}: no image at {path}") from e
    except (ValueError, OSError) as e:
        raise RequestError(f"{what}: {e}") from e
    if not bool(torch.isfinite(x).all()):
        raise RequestError(f"{what}: {path} gives NaN or inf pixel values")
    return x, hashlib.sha256(data).hexdigest()


class ConceptJob:
    """A concept request on a multimodal checkpoint (see the module doc)."""

    def __init__(self, merged: MergedRequest, data: bytes, source: str, *, device: str | torch.device) -> None:
        from unlearn_ext.siu.api import ConceptRequest, concept_training_data
        from unlearn_ext.siu.checkpoint import load_multimodal_checkpoint_bytes

        if merged.kind != "concept":
            raise RequestError(
                f"{source} is a multimodal checkpoint: it takes concept requests (forget.concept + forget.image), "
                f"not {merged.kind} requests"
            )
        self.merged, self.source = merged, source
        self.model, self.tokenizer, self.record = load_multimodal_checkpoint_bytes(data, source=source, device=device)
        config = self.record["config"]
        check_expected_config({**config["lm"], **{k: v for k, v in config.items() if k != "lm"}}, merged.model, source)
        self.config = _finetune_config(merged.method, dict(merged.hparams), merged.seed)

        concept, checks = dict(merged.concept or {}), dict(merged.checks or {})
        self.image_sha256: dict[str, str] = {}
        image = self._image(concept["image"], "forget.image")
        retain_images = [
            (self._image(e["image"], f"forget.retain_images[{i}]"), e["question"], e["answer"])
            for i, e in enumerate(concept.get("retain_images", []))
        ]
        self.held_out = [
            self._image(p, f"checks.held_out_images[{i}]") for i, p in enumerate(checks.get("held_out_images", []))
        ]
        self.retain_checks = [
            (e["question"], self._image(e["image"], f"checks.retain[{i}].image") if e["image"] else None, e["expect"])
            for i, e in enumerate(checks.get("retain", []))
        ]
        text = {**(self.record.get("concept_defaults") or {})}
        text.update({k: v for k, v in concept.items() if k not in ("concept", "image", "retain_images")})
        try:
            self.request = ConceptRequest(concept=concept["concept"], image=image, retain_images=retain_images, **text)
        except TypeError as e:
            raise RequestError(f"{source}: bad concept_defaults or concept text: {e}") from e
        self.prompts = [p.format(kind=self.request.kind) for p in self.request.identity_prompts]
        try:  # the method's training data, built once here so that bad text is refused before any write
            concept_training_data(
                merged.method, self.request, self.tokenizer, image_token_id=self.model.image_token_id,
                num_image_tokens=self.model.num_image_tokens,
            )  # fmt: skip
        except ValueError as e:
            raise RequestError(f"request {merged.request_ids[0]!r}: {e}") from e

    def request_digest(self, request) -> str:
        """What identifies ``request`` (a :class:`DeletionRequest` of this run): its JSON digest and the
        sha256 of every image it names, so that the same id re-filed over changed images is a
        different request."""
        concept, checks = dict(request.concept or {}), dict(request.checks or {})
        paths = [concept["image"], *(e["image"] for e in concept.get("retain_images", []))]
        paths += [*checks.get("held_out_images", []), *(e["image"] for e in checks.get("retain", []) if e["image"])]
        return canonical_digest({"request": request.digest, "images_sha256": {p: self.image_sha256[p] for p in paths}})

    def _image(self, path: str, what: str) -> torch.Tensor:
        x, digest = _read_image(path, self.record, what)
        self.image_sha256[path] = digest
        return x

    def evaluate(self, model: nn.Module, original: nn.Module | None) -> tuple[dict[str, float], dict]:
        from unlearn_ext.siu.metrics import answer_accuracy, concept_hit_rate

        tok, word, image = self.tokenizer, self.request.concept, self.request.image
        hit, answers = concept_hit_rate(model, tok, self.prompts, [image] * len(self.prompts), word)
        metrics = {"forget_hit_rate": float(hit)}
        if self.held_out:
            held, _ = concept_hit_rate(model, tok, [self.prompts[0]] * len(self.held_out), self.held_out, word)
            metrics["held_out_hit_rate"] = float(held)
        if self.retain_checks:
            q, imgs, expect = zip(*self.retain_checks, strict=True)
            metrics["retain_acc"] = float(answer_accuracy(model, tok, list(q), list(imgs), list(expect))[0])
        return metrics, {"forget_image_answers": dict(zip(self.prompts, answers, strict=True))}

    def unlearn(self, progress: bool) -> nn.Module:
        from unlearn_ext.siu.api import unlearn_concept

        model = self.model
        self.result = unlearn_concept(
            model, self.tokenizer, self.request, method=self.merged.method, image_token_id=model.image_token_id,
            num_image_tokens=model.num_image_tokens, config=self.config, progress=progress,
        )  # fmt: skip
        return self.result.model

    def log_tail(self) -> list:
        result = getattr(self, "result", None)
        return result.log[-3:] if result is not None else []

    def gates(self, before: dict, after: dict) -> dict[str, dict]:
        rules = {
            "max_forget_hit_rate": ("forget_hit_rate after", lambda b, a: a["forget_hit_rate"]),
            "max_held_out_hit_rate": ("held_out_hit_rate after", lambda b, a: a["held_out_hit_rate"]),
            "max_retain_drop": ("retain_acc before - after", lambda b, a: b["retain_acc"] - a["retain_acc"]),
        }
        return gate_results(self.merged, rules, before, after)

    def describe(self) -> dict[str, Any]:
        concept = self.merged.concept or {}
        return {
            "forget": {
                "kind": "concept",
                "concept": self.request.concept,
                "image": concept["image"],
                "image_sha256": self.image_sha256[concept["image"]],
                "identity_prompts": self.prompts,
                "num_retain_images": len(self.request.retain_images),
                "num_held_out_images": len(self.held_out),
                "num_retain_checks": len(self.retain_checks),
            },
            "images_sha256": dict(self.image_sha256),
            "finetune": {k: v for k, v in dataclasses.asdict(self.config).items() if k != "distributed"},
        }

    def history_forget(self) -> dict[str, Any]:
        concept = self.merged.concept or {}
        return {"kind": "concept", "concept": self.request.concept, "image_sha256": self.image_sha256[concept["image"]]}

    def serialise(self, model: nn.Module, metadata: dict) -> bytes:
        from unlearn_ext.siu.checkpoint import load_multimodal_checkpoint_bytes, multimodal_checkpoint_bytes

        record = self.record
        blob = multimodal_checkpoint_bytes(
            model.cpu(), self.tokenizer, image_shape=tuple(record["config"]["input_shape"]),
            image_preprocess=record["image_preprocess"], concept_defaults=record.get("concept_defaults"),
            metadata=metadata,
        )  # fmt: skip
        reloaded, _, _ = load_multimodal_checkpoint_bytes(blob, source="the new checkpoint")
        if not same_state(reloaded, model):
            raise RuntimeError("the serialised checkpoint does not load back identical; nothing was published")
        return blob
