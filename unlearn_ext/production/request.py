"""Deletion requests: the JSON a user files, validated, and several pending requests merged into one run.

A request file holds one request object or a list of them::

    {
      "request_id": "gdpr-2026-0042",
      "forget": {"classes": [3]},                      # or {"sample_ids": [12, 408]}, or
                                                       #    {"concept": "cat", "image": "cat.png"}
      "dataset": {"name": "mnist", "seed": 0},         # the data the checkpoint was trained on
      "method": "mnemonic",
      "hparams": {},                                   # the method's hyperparameters
      "seed": 0,
      "gates": {"max_forget_acc": 0.05, "max_retain_drop": 0.03}
    }

Gates (all optional, fractions in [0, 1]; a merged run takes the strictest of each):

* ``max_forget_acc``: accuracy on the forgotten training samples after unlearning;
* ``max_forget_class_test_acc``: accuracy on the forgotten classes' test images (class requests);
* ``max_retain_drop``: retain-set accuracy before minus after;
* ``max_test_drop``: test accuracy before minus after (for class requests, on the kept classes' test
  images: forgetting a class must lower accuracy on that class);
* ``max_mia``: entropy membership-inference rate on the forget set after unlearning.
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

REQUEST_KEYS = frozenset({"request_id", "forget", "dataset", "method", "hparams", "seed", "gates", "model", "note"})
FORGET_KINDS = ("classes", "sample_ids", "concept")
GATE_KEYS = ("max_forget_acc", "max_forget_class_test_acc", "max_retain_drop", "max_test_drop", "max_mia")
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


def parse_request(obj: Any, *, source: str = "") -> DeletionRequest:
    """Validate one request object (a dict decoded from JSON).

    Raises:
        RequestError: a missing or unknown key, a wrong type, an invalid id, an empty or ambiguous
            forget set, an unknown dataset or method, unknown hyperparameters, a gate outside [0, 1].
    """
    from unlearn_ext.methods import method_class

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
    extra = sorted(set(forget) - set(FORGET_KINDS) - {"image"})
    if len(kinds) != 1 or extra:
        raise RequestError(f"{where} forget must have exactly one of {list(FORGET_KINDS)}, got keys {sorted(forget)}")
    kind = kinds[0]
    classes = sample_ids = concept = None
    if kind == "classes":
        classes = tuple(sorted(set(_int_list(forget["classes"], "forget.classes", where))))
    elif kind == "sample_ids":
        sample_ids = tuple(sorted(set(_int_list(forget["sample_ids"], "forget.sample_ids", where))))
    else:
        name, image = forget.get("concept"), forget.get("image")
        if not isinstance(name, str) or not name.strip():
            raise RequestError(f"{where} forget.concept must be a non-empty string (the concept's name)")
        if not isinstance(image, str) or not image:
            raise RequestError(f"{where} forget.concept needs forget.image: the path of one image of the concept")
        concept = {"concept": name, "image": image}
    if "image" in forget and kind != "concept":
        raise RequestError(f"{where} forget.image only goes with forget.concept")

    dataset = dataset_seed = None
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
    try:
        cls = method_class(method)
    except (ValueError, NotImplementedError) as e:
        raise RequestError(f"{where} {e}") from e
    hparams = obj.get("hparams", {})
    if not isinstance(hparams, Mapping):
        raise RequestError(f"{where} hparams must be an object of hyperparameter: value")
    import dataclasses

    known = {f.name for f in dataclasses.fields(cls) if f.init} - {"seed", "inplace", "progress"}
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
    bad = sorted(set(gates_obj) - set(GATE_KEYS))
    if bad:
        raise RequestError(f"{where} unknown gate(s) {bad}; gates are {list(GATE_KEYS)}")
    gates = {}
    for k, v in gates_obj.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and 0.0 <= v <= 1.0):
            raise RequestError(f"{where} gate {k} must be a number in [0, 1] (a fraction), got {v!r}")
        gates[k] = float(v)
    if "max_forget_class_test_acc" in gates and kind != "classes":
        raise RequestError(f"{where} gate max_forget_class_test_acc needs a class request (forget.classes)")

    model = obj.get("model", {})
    if not isinstance(model, Mapping):
        raise RequestError(f"{where} model must be an object of expected config values (e.g. arch, num_classes)")
    if "note" in obj and not isinstance(obj["note"], str):
        raise RequestError(f"{where} note must be a string")

    return DeletionRequest(
        request_id=rid, kind=kind, classes=classes, sample_ids=sample_ids, concept=concept, dataset=dataset,
        dataset_seed=dataset_seed, method=method, hparams=dict(hparams), seed=seed, gates=gates, model=dict(model),
        digest=canonical_digest(dict(obj)), source=source,
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
        hparams=dict(first.hparams), seed=first.seed, gates=gates, model=dict(first.model),
    )  # fmt: skip
