"""Deletion requests: the JSON a user files, validated, and several pending requests merged into one run.

A request file holds one request object or a list of them::

    {
      "request_id": "gdpr-2026-0042",
      "forget": {"classes": [3]},                      # or {"sample_ids": [12, 408]}, or a concept
      "dataset": {"name": "mnist", "seed": 0},         # the data the checkpoint was trained on
      "method": "mnemonic",
      "hparams": {},                                   # the method's hyperparameters
      "seed": 0,
      "gates": {"max_forget_acc": 0.05, "max_retain_drop": 0.03}
    }

Gates of class and sample requests (all optional, fractions in [0, 1]; a merged run takes the
strictest of each):

* ``max_forget_acc``: accuracy on the forgotten training samples after unlearning;
* ``max_forget_class_test_acc``: accuracy on the forgotten classes' test images (class requests);
* ``max_retain_drop``: retain-set accuracy before minus after;
* ``max_test_drop``: test accuracy before minus after (for class requests, on the kept classes' test
  images: forgetting a class must lower accuracy on that class);
* ``max_mia``: entropy membership-inference rate on the forget set after unlearning.

A concept request forgets a visual concept from a multimodal checkpoint
(:mod:`unlearn_ext.siu.checkpoint`) with SIU or a baseline of its setting (``siu``, ``ga``,
``ga_kl``, ``po``; ``hparams`` are :class:`unlearn_ext.siu.train.FinetuneConfig` fields). Image
paths are relative to the request file's folder::

    {
      "request_id": "takedown-17",
      "forget": {
        "concept": "seven", "image": "digit7_0.png",   # the concept's name in answers; one image of it
        "kind": "digit", "fictitious_name": "Zorblat", # optional: ConceptRequest's text fields
        "counterfactual_description": "...", "facts": ["Seven is odd."],
        "other_concepts": {"Is three odd?": "Yes, three is odd."},
        "identity_prompts": ["Which digit is this?"], "identity_answer": "This is the digit {concept}.",
        "refusal": "I cannot tell.",
        "retain_images": [{"image": "digit3_0.png", "question": "Which digit is this?",
                           "answer": "This is the digit three."}]           # SIU's image type-4 data
      },
      "checks": {                                      # what the gates measure, besides the forget image
        "held_out_images": ["digit7_1.png"],           # other images of the concept
        "retain": [{"image": "digit3_1.png", "question": "Which digit is this?", "expect": "three"},
                   {"question": "How many days are in a week?", "expect": ["seven", "7"]}]
      },
      "method": "siu", "hparams": {"steps": 24, "lr": 0.001, "lora_rank": 16},
      "gates": {"max_forget_hit_rate": 0.0, "max_held_out_hit_rate": 0.5, "max_retain_drop": 0.2}
    }

Concept gates: ``max_forget_hit_rate`` (the share of the identity prompts on the forget image whose
greedy answer names the concept, after), ``max_held_out_hit_rate`` (the same on
``checks.held_out_images``), ``max_retain_drop`` (the share of ``checks.retain`` answered with an
expected word as a whole word, before minus after).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unlearn_ext.data.datasets import DATASETS

REQUEST_KEYS = frozenset(
    {"request_id", "forget", "dataset", "checks", "method", "hparams", "seed", "gates", "model", "note"}
)
FORGET_KINDS = ("classes", "sample_ids", "concept")
CLASSIFIER_GATES = ("max_forget_acc", "max_forget_class_test_acc", "max_retain_drop", "max_test_drop", "max_mia")
CONCEPT_GATES = ("max_forget_hit_rate", "max_held_out_hit_rate", "max_retain_drop")
GATE_KEYS = tuple(dict.fromkeys(CLASSIFIER_GATES + CONCEPT_GATES))
#: The optional text fields of a concept's ``forget`` object (:class:`unlearn_ext.siu.ConceptRequest`).
CONCEPT_TEXT_KEYS = {
    "kind": "str",
    "fictitious_name": "str",
    "counterfactual_description": "str",
    "facts": "list",
    "other_concepts": "dict",
    "identity_prompts": "list",
    "identity_answer": "str|list",
    "recognition_prompts": "list",
    "refusal": "str",
}
#: FinetuneConfig fields a request may not set (the request's method and seed set them; one process).
_FIXED_FINETUNE_FIELDS = frozenset({"objective", "seed", "distributed"})
_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$")


class RequestError(ValueError):
    """A deletion request that is malformed or cannot be applied to the given checkpoint."""


@dataclass(frozen=True)
class DeletionRequest:
    """One validated request. ``digest`` is the sha256 of its canonical JSON (re-filing the same id
    with other content is detected by it)."""

    request_id: str
    kind: str  # "classes" | "sample_ids" | "concept"
    classes: tuple[int, ...] | None
    sample_ids: tuple[int, ...] | None
    concept: Mapping[str, str] | None
    dataset: str | None
    dataset_seed: int | None
    method: str
    hparams: Mapping[str, Any]
    seed: int
    gates: Mapping[str, float]
    model: Mapping[str, Any]
    digest: str
    source: str = ""
    checks: Mapping[str, Any] | None = None  # concept requests: held_out_images, retain


@dataclass(frozen=True)
class MergedRequest:
    """Several requests applied in one run: one method, the union of what they forget, the strictest gates."""

    requests: tuple[DeletionRequest, ...]
    kind: str
    classes: tuple[int, ...] | None
    sample_ids: tuple[int, ...] | None
    dataset: str | None
    dataset_seed: int | None
    method: str
    hparams: Mapping[str, Any]
    seed: int
    gates: Mapping[str, float]
    model: Mapping[str, Any] = field(default_factory=dict)
    concept: Mapping[str, Any] | None = None
    checks: Mapping[str, Any] | None = None

    @property
    def request_ids(self) -> list[str]:
        return [r.request_id for r in self.requests]


def _where(source: str, request_id: str | None = None) -> str:
    rid = f" request {request_id!r}" if request_id else ""
    return f"{source}:{rid}" if source else (f"{rid.strip()}:" if rid else "request:")


def _int(value: Any, what: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{where} {what} must be an integer, got {value!r} ({type(value).__name__})")
    return value


def _int_list(value: Any, what: str, where: str) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise RequestError(f"{where} {what} must be a JSON list of integers, got {type(value).__name__}")
    if not value:
        raise RequestError(f"{where} {what} is empty: the forget set would be empty")
    out = tuple(_int(v, f"{what} entry", where) for v in value)
    negative = [v for v in out if v < 0]
    if negative:
        raise RequestError(f"{where} {what} must be non-negative, got {negative[:5]}")
    return out


def canonical_digest(obj: Any) -> str:
    """sha256 of ``obj`` as canonical JSON (sorted keys, no whitespace)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _method_hparams(method: str, kind: str, where: str) -> set[str]:
    """The hyperparameter names ``method`` takes for a request of ``kind`` (raises for an unknown method)."""
    import dataclasses

    if kind == "concept":
        from unlearn_ext.siu.api import CONCEPT_METHODS
        from unlearn_ext.siu.train import FinetuneConfig

        if method not in CONCEPT_METHODS:
            raise RequestError(
                f"{where} unknown concept-unlearning method {method!r}; concept requests take {list(CONCEPT_METHODS)}"
            )
        return {f.name for f in dataclasses.fields(FinetuneConfig)} - _FIXED_FINETUNE_FIELDS
    from unlearn_ext.methods import method_class

    try:
        cls = method_class(method)
    except (ValueError, NotImplementedError) as e:
        raise RequestError(f"{where} {e}") from e
    return {f.name for f in dataclasses.fields(cls) if f.init} - {"seed", "inplace", "progress"}


def _str(value: Any, what: str, where: str, *, empty: bool = False) -> str:
    if not isinstance(value, str) or (not empty and not value.strip()):
        raise RequestError(f"{where} {what} must be a non-empty string, got {value!r}")
    return value


def _str_list(value: Any, what: str, where: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise RequestError(f"{where} {what} must be a non-empty JSON list of strings, got {value!r}")
    return [_str(v, f"{what} entry", where) for v in value]


def _path(value: Any, what: str, where: str, base_dir: Path) -> str:
    p = Path(_str(value, what, where))
    return str(p if p.is_absolute() else base_dir / p)


def _parse_concept(forget: Mapping, where: str, base_dir: Path) -> dict[str, Any]:
    """The validated ``forget`` object of a concept request, image paths made absolute."""
    out: dict[str, Any] = {"concept": _str(forget["concept"], "forget.concept", where)}
    if "image" not in forget:
        raise RequestError(f"{where} forget.concept needs forget.image: the path of one image of the concept")
    out["image"] = _path(forget["image"], "forget.image", where, base_dir)
    for key, kind in CONCEPT_TEXT_KEYS.items():
        if key not in forget:
            continue
        v, what = forget[key], f"forget.{key}"
        if kind == "str":
            out[key] = _str(v, what, where, empty=key == "counterfactual_description")
        elif kind == "list":
            out[key] = _str_list(v, what, where)
        elif kind == "str|list":
            out[key] = _str(v, what, where) if isinstance(v, str) else _str_list(v, what, where)
        else:
            if not isinstance(v, Mapping) or not all(isinstance(a, str) and isinstance(b, str) for a, b in v.items()):
                raise RequestError(f"{where} {what} must be an object of question: answer strings")
            out[key] = dict(v)
    retain = forget.get("retain_images", [])
    if not isinstance(retain, list):
        raise RequestError(f"{where} forget.retain_images must be a list of {{image, question, answer}} objects")
    out["retain_images"] = []
    for i, entry in enumerate(retain):
        what = f"forget.retain_images[{i}]"
        if not isinstance(entry, Mapping) or set(entry) != {"image", "question", "answer"}:
            raise RequestError(f"{where} {what} must be an object with exactly image, question and answer")
        out["retain_images"].append(
            {
                "image": _path(entry["image"], f"{what}.image", where, base_dir),
                "question": _str(entry["question"], f"{what}.question", where),
                "answer": _str(entry["answer"], f"{what}.answer", where),
            }
        )
    return out


def _parse_checks(checks: Any, where: str, base_dir: Path) -> dict[str, Any]:
    """The validated ``checks`` object of a concept request (held-out images, retain questions)."""
    if not isinstance(checks, Mapping) or set(checks) - {"held_out_images", "retain"}:
        raise RequestError(f"{where} checks must be an object with held_out_images and/or retain, got {checks!r}")
    held = checks.get("held_out_images", [])
    if not isinstance(held, list):
        raise RequestError(f"{where} checks.held_out_images must be a list of image paths")
    out: dict[str, Any] = {
        "held_out_images": [_path(p, f"checks.held_out_images[{i}]", where, base_dir) for i, p in enumerate(held)],
        "retain": [],
    }
    retain = checks.get("retain", [])
    if not isinstance(retain, list):
        raise RequestError(f"{where} checks.retain must be a list of {{image?, question, expect}} objects")
    for i, entry in enumerate(retain):
        what = f"checks.retain[{i}]"
        keys = set(entry) if isinstance(entry, Mapping) else set()
        if not isinstance(entry, Mapping) or not {"question", "expect"} <= keys <= {"image", "question", "expect"}:
            raise RequestError(f"{where} {what} must be an object with question, expect and optionally image")
        expect = entry["expect"]
        expect = [expect] if isinstance(expect, str) else expect
        expect = _str_list(expect, f"{what}.expect", where)
        out["retain"].append(
            {
                "image": _path(entry["image"], f"{what}.image", where, base_dir) if "image" in entry else None,
                "question": _str(entry["question"], f"{what}.question", where),
                "expect": expect,
            }
        )
    return out


def parse_request(obj: Any, *, source: str = "") -> DeletionRequest:
    """Validate one request object (a dict decoded from JSON).

    ``source``: the request file (image paths of concept requests are relative to its folder;
    to the working directory when empty).

    Raises:
        RequestError: a missing or unknown key, a wrong type, an invalid id, an empty or ambiguous
            forget set, an unknown dataset or method, unknown hyperparameters, a gate outside [0, 1]
            or one that does not fit the request's kind.
    """

    if not isinstance(obj, Mapping):
        raise RequestError(f"{_where(source)} a request must be a JSON object, got {type(obj).__name__}")
    rid = obj.get("request_id")
    if not isinstance(rid, str) or not _ID_PATTERN.match(rid):
        raise RequestError(
            f"{_where(source)} request_id must be a string of 1-128 letters, digits and ._:@/- starting with a "
            f"letter or digit, got {rid!r}"
        )
    where = _where(source, rid)
    unknown = sorted(set(obj) - REQUEST_KEYS)
    if unknown:
        raise RequestError(f"{where} unknown key(s) {unknown}; a request has {sorted(REQUEST_KEYS)}")
    for key in ("forget", "method"):
        if key not in obj:
            raise RequestError(f"{where} missing required key {key!r}")

    forget = obj["forget"]
    if not isinstance(forget, Mapping):
        raise RequestError(f"{where} forget must be an object with one of {list(FORGET_KINDS)}")
    kinds = [k for k in FORGET_KINDS if k in forget]
    if len(kinds) != 1:
        raise RequestError(f"{where} forget must have exactly one of {list(FORGET_KINDS)}, got keys {sorted(forget)}")
    kind = kinds[0]
    allowed = {kind} | ({"image", "retain_images", *CONCEPT_TEXT_KEYS} if kind == "concept" else set())
    extra = sorted(set(forget) - allowed)
    if extra:
        hint = " (they go with forget.concept)" if set(extra) & {"image", "retain_images", *CONCEPT_TEXT_KEYS} else ""
        raise RequestError(f"{where} forget has unknown or misplaced key(s) {extra}{hint}")
    classes = sample_ids = concept = checks = None
    base_dir = Path(source).parent if source else Path.cwd()
    if kind == "classes":
        classes = tuple(sorted(set(_int_list(forget["classes"], "forget.classes", where))))
    elif kind == "sample_ids":
        sample_ids = tuple(sorted(set(_int_list(forget["sample_ids"], "forget.sample_ids", where))))
    else:
        concept = _parse_concept(forget, where, base_dir)
        checks = _parse_checks(obj.get("checks", {}), where, base_dir)
    if "checks" in obj and kind != "concept":
        raise RequestError(f"{where} checks only go with forget.concept (class and sample requests use the dataset)")

    dataset = dataset_seed = None
    if "dataset" in obj and kind == "concept":
        raise RequestError(f"{where} a concept request takes its images from forget and checks, not a dataset")
    if "dataset" in obj:
        ds = obj["dataset"]
        if isinstance(ds, str):
            ds = {"name": ds}
        if not isinstance(ds, Mapping) or set(ds) - {"name", "seed"} or "name" not in ds:
            raise RequestError(
                f'{where} dataset must be {{"name": ..., "seed": ...}} or a name, got {obj["dataset"]!r}'
            )
        if ds["name"] not in DATASETS:
            raise RequestError(f"{where} unknown dataset {ds['name']!r}; bundled: {list(DATASETS)}")
        dataset = ds["name"]
        if "seed" in ds:
            dataset_seed = _int(ds["seed"], "dataset.seed", where)

    method = obj["method"]
    if not isinstance(method, str):
        raise RequestError(f"{where} method must be a string, got {method!r}")
    hparams = obj.get("hparams", {})
    if not isinstance(hparams, Mapping):
        raise RequestError(f"{where} hparams must be an object of hyperparameter: value")
    known = _method_hparams(method, kind, where)
    bad = sorted(set(hparams) - known)
    if bad:
        raise RequestError(f"{where} method {method!r} has no hyperparameter(s) {bad}; it takes {sorted(known)}")
    for k, v in hparams.items():
        if not isinstance(v, (int, float, str, bool, type(None), list)):
            raise RequestError(f"{where} hparams.{k} must be a JSON number, string, bool, list or null, got {v!r}")
        if isinstance(v, float) and not math.isfinite(v):
            raise RequestError(f"{where} hparams.{k} is not finite: {v!r}")
    seed = _int(obj.get("seed", 0), "seed", where)

    gates_obj = obj.get("gates", {})
    if not isinstance(gates_obj, Mapping):
        raise RequestError(f"{where} gates must be an object, got {type(gates_obj).__name__}")
    kind_gates = CONCEPT_GATES if kind == "concept" else CLASSIFIER_GATES
    bad = sorted(set(gates_obj) - set(kind_gates))
    if bad:
        what = "concept" if kind == "concept" else "class and sample"
        raise RequestError(
            f"{where} unknown gate(s) {bad} for a {kind} request; {what} requests have {list(kind_gates)}"
        )
    gates = {}
    for k, v in gates_obj.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and 0.0 <= v <= 1.0):
            raise RequestError(f"{where} gate {k} must be a number in [0, 1] (a fraction), got {v!r}")
        gates[k] = float(v)
    if "max_forget_class_test_acc" in gates and kind != "classes":
        raise RequestError(f"{where} gate max_forget_class_test_acc needs a class request (forget.classes)")
    if kind == "concept":
        for gate, check in (("max_held_out_hit_rate", "held_out_images"), ("max_retain_drop", "retain")):
            if gate in gates and not checks.get(check):
                raise RequestError(f"{where} gate {gate} needs checks.{check} (what it measures)")

    model = obj.get("model", {})
    if not isinstance(model, Mapping):
        raise RequestError(f"{where} model must be an object of expected config values (e.g. arch, num_classes)")
    if "note" in obj and not isinstance(obj["note"], str):
        raise RequestError(f"{where} note must be a string")

    return DeletionRequest(
        request_id=rid, kind=kind, classes=classes, sample_ids=sample_ids, concept=concept, dataset=dataset,
        dataset_seed=dataset_seed, method=method, hparams=dict(hparams), seed=seed, gates=gates, model=dict(model),
        digest=canonical_digest(dict(obj)), source=source, checks=checks,
    )  # fmt: skip


def load_requests(paths: Sequence[str | os.PathLike]) -> list[DeletionRequest]:
    """Read and validate request files (each one object or a list of objects).

    Raises:
        FileNotFoundError: a missing file.
        RequestError: unreadable JSON, an invalid request, or the same request id twice.
    """
    out: list[DeletionRequest] = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"no request file at {path}")
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(f"{path}: not valid JSON: {e}") from e
        items = data if isinstance(data, list) else [data]
        if not items:
            raise RequestError(f"{path}: an empty list of requests")
        out.extend(parse_request(item, source=str(path)) for item in items)
    seen: dict[str, str] = {}
    for r in out:
        if r.request_id in seen:
            raise RequestError(f"request id {r.request_id!r} appears twice ({seen[r.request_id]} and {r.source})")
        seen[r.request_id] = r.source
    if not out:
        raise RequestError("no requests given")
    return out


def merge_requests(requests: Sequence[DeletionRequest]) -> MergedRequest:
    """Merge pending requests into one run.

    Raises:
        RequestError: no requests; requests that disagree on the method, its hyperparameters, the seed,
            the dataset or the expected model config; class and sample requests mixed (apply them in
            separate runs: the methods treat the two differently); concept requests mixed with others.
    """
    if not requests:
        raise RequestError("no requests to merge")
    first = requests[0]

    def agree(attr: str, what: str) -> None:
        values = {json.dumps(getattr(r, attr), sort_keys=True) for r in requests}
        if len(values) > 1:
            detail = ", ".join(f"{r.request_id}: {getattr(r, attr)!r}" for r in requests)
            raise RequestError(f"cannot merge requests with different {what} ({detail}): apply them in separate runs")

    agree("kind", "kinds of forget set (classes / sample_ids / concept)")
    agree("method", "methods")
    agree("hparams", "hyperparameters")
    agree("seed", "seeds")
    agree("model", "expected model configs")
    datasets = {r.dataset for r in requests if r.dataset is not None}
    seeds = {r.dataset_seed for r in requests if r.dataset_seed is not None}
    if len(datasets) > 1 or len(seeds) > 1:
        raise RequestError(f"cannot merge requests on different datasets: {sorted(datasets)} seeds {sorted(seeds)}")
    if first.kind == "concept" and len(requests) > 1:
        raise RequestError("concept requests are applied one at a time")
    classes = sample_ids = None
    if first.kind == "classes":
        classes = tuple(sorted({c for r in requests for c in r.classes or ()}))
    elif first.kind == "sample_ids":
        sample_ids = tuple(sorted({i for r in requests for i in r.sample_ids or ()}))
    gates: dict[str, float] = {}
    for r in requests:
        for k, v in r.gates.items():
            gates[k] = min(v, gates.get(k, v))
    return MergedRequest(
        requests=tuple(requests), kind=first.kind, classes=classes, sample_ids=sample_ids,
        dataset=next(iter(datasets), None), dataset_seed=next(iter(seeds), None), method=first.method,
        hparams=dict(first.hparams), seed=first.seed, gates=gates, model=dict(first.model), concept=first.concept,
        checks=first.checks,
    )  # fmt: skip
