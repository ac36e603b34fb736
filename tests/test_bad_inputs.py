"""The bad-input suite: every case must raise a clear, specific error, and leave no file created or
changed and no given model or tensor modified.

Cases span the ops, the Fisher, the methods, evaluation, data splits, checkpoints, deletion requests and
the CLI. Each is ``(id, call(ctx), exception type, regex the message must match)``; ``ctx`` holds a
scratch folder (snapshotted before and after), a small model (its state compared before and after)
and a valid checkpoint and request to corrupt.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from unlearn_ext import unlearn
from unlearn_ext.cli import main as cli_main
from unlearn_ext.data import forget_split_from_ids, load_dataset, make_forget_split
from unlearn_ext.eval import average_gap, evaluate
from unlearn_ext.fisher import diagonal_fisher
from unlearn_ext.models import TrainConfig, build_model, load_checkpoint, save_checkpoint, train_classifier
from unlearn_ext.models.checkpoint import checkpoint_bytes
from unlearn_ext.ops import fused_linear_ce_norm, fused_linear_masked_kl, sq_grad_linear
from unlearn_ext.production import RequestError, apply_requests, parse_request

H, V, N = 4, 7, 5


@dataclass
class Ctx:
    tmp: Path
    model: nn.Module
    checkpoint: Path
    request: dict

    @property
    def x(self) -> torch.Tensor:
        return torch.randn(6, 1, 8, 8)

    y = torch.tensor([0, 1, 2, 0, 1, 2])

    def batches(self, x=None, y=None):
        return [(self.x if x is None else x, self.y if y is None else y)]

    def write(self, name: str, content) -> Path:
        path = self.tmp / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content if isinstance(content, str) else json.dumps(content))
        return path

    def cli(self, *args: str) -> None:
        """Run the CLI; a non-zero exit becomes SystemExit(code) so cases can match on it."""
        code = cli_main([*args, "--no-progress"] if args and args[0] != "info" else list(args))
        if code:
            raise SystemExit(code)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    ds = load_dataset("digits", seed=0)
    model = train_classifier("mlp", ds.x_train, ds.y_train, num_classes=10, config=TrainConfig(epochs=2), hidden=16)
    path = tmp_path_factory.mktemp("bad-ckpt") / "model.safetensors"
    save_checkpoint(model, path, metadata={"dataset": {"name": "digits", "seed": 0}})
    return model, path


def _ops_cases():
    h, w, t = torch.randn(N, H), torch.randn(V, H), torch.randint(0, V, (N,))
    ce, kl = fused_linear_ce_norm, fused_linear_masked_kl
    nan = torch.full((N, H), float("nan"))
    return [
        ("ce_norm hidden 1-D", lambda c: ce(h[0], w, t), ValueError, r"hidden must be 2-D \[N, H\]"),
        ("ce_norm width mismatch", lambda c: ce(h, torch.randn(V, 3), t), ValueError, r"weight must be \[V, 4\]"),
        ("ce_norm integer hidden", lambda c: ce(h.long(), w, t), ValueError, "hidden must be float32, float64"),
        ("ce_norm float target", lambda c: ce(h, w, t.float()), ValueError, "target must be an integer tensor"),
        ("ce_norm target out of range", lambda c: ce(h, w, t + V), ValueError, r"must be in \[0, 7\) or ignore_index"),
        ("ce_norm NaN hidden", lambda c: ce(nan, w, t), ValueError, "hidden contains NaN or inf"),
        ("ce_norm unknown reduction", lambda c: ce(h, w, t, reduction="avg"), ValueError, "reduction must be one of"),
        ("ce_norm unknown backend", lambda c: ce(h, w, t, backend="tpu"), ValueError, "backend must be one of"),
        ("ce_norm cuda backend, cpu tensors", lambda c: ce(h, w, t, backend="cuda"), ValueError, "needs CUDA tensors"),
        ("ce_norm forget_mask length", lambda c: ce(h, w, t, forget_mask=torch.zeros(4, dtype=torch.bool)),
         ValueError, r"forget_mask must have shape \[5\]"),
        ("ce_norm mixed dtypes", lambda c: ce(h.double(), w, t), ValueError, "weight must have hidden's dtype"),
        ("ce_norm NaN norm_weight", lambda c: ce(h, w, t, norm_weight=float("nan")), ValueError, "finite number"),
        ("masked_kl vocab_mask length", lambda c: kl(h, w, h, w, vocab_mask=torch.ones(6, dtype=torch.bool)),
         ValueError, r"vocab_mask must have shape \[7\]"),
        ("masked_kl temperature 0", lambda c: kl(h, w, h, w, temperature=0.0), ValueError, "temperature must be"),
        ("masked_kl reference vocabulary", lambda c: kl(h, w, h, torch.randn(V + 1, H)), ValueError, "ref_weight must"),
        ("masked_kl float token_mask", lambda c: kl(h, w, h, w, token_mask=torch.ones(N)), ValueError, "bool tensor"),
        ("masked_kl inf reference", lambda c: kl(h, w, torch.full((N, H), float("inf")), w), ValueError,
         "ref_hidden contains NaN"),
        ("sq_grad_linear batch mismatch", lambda c: sq_grad_linear(torch.randn(3, 4), torch.randn(2, 5)), ValueError,
         "grad_out"),
    ]  # fmt: skip


def _muso_linear(forget_mask: torch.Tensor):
    from unlearn_ext.methods.muso_linear import muso_linear

    phi = torch.randn(10, 30, dtype=torch.float64)
    w = torch.zeros(30, dtype=torch.float64)
    return muso_linear(phi, torch.randn(10, dtype=torch.float64), forget_mask, w, w)


def _fisher_method_eval_cases():
    def ul(method, forget, retain=None, **hp):
        return lambda c: unlearn(c.model, method, forget=forget(c), retain=retain(c) if retain else None, **hp)

    def ok(c):
        return c.batches()

    nan_x = lambda c: c.batches(x=torch.full((6, 1, 8, 8), float("nan")))  # noqa: E731
    return [
        ("fisher empty batches", lambda c: diagonal_fisher(c.model, []), ValueError, "no samples"),
        ("fisher unknown granularity", lambda c: diagonal_fisher(c.model, ok(c), granularity="pixel"), ValueError,
         "granularity must be one of"),
        ("fisher NaN inputs", lambda c: diagonal_fisher(c.model, nan_x(c)), ValueError, "non-finite per-sample loss"),
        ("fisher unknown parameter", lambda c: diagonal_fisher(c.model, ok(c), params=["nope"]), ValueError,
         r"unknown parameter names in params: \['nope'\]"),
        ("unknown method", ul("forget_all", ok), ValueError, "unknown unlearning method 'forget_all'"),
        ("unknown hyperparameter", ul("finetune", ok, ok, epoch=3), ValueError, r"no hyperparameter\(s\) \['epoch'\]"),
        ("LLM method on a classifier", ul("siu", ok), ValueError, "forgets a visual concept"),
        ("empty forget set", ul("neggrad", lambda c: c.batches(x=c.x[:0], y=c.y[:0]), ok), ValueError,
         "the forget set is empty"),
        ("targets out of class range", ul("neggrad", lambda c: c.batches(y=c.y + 10), ok), ValueError,
         r"targets outside the model's classes 0\.\.9"),
        ("NaN forget inputs", ul("neggrad", nan_x, ok), ValueError, "inputs contain NaN or inf"),
        ("missing retain set", ul("finetune", ok), ValueError, "needs the retain set"),
        ("inputs of the wrong shape", ul("neggrad", lambda c: c.batches(x=torch.randn(6, 1, 5, 5)), ok), ValueError,
         "cannot take the forget inputs of shape"),
        ("2-D targets", ul("neggrad", lambda c: c.batches(y=c.y[:, None]), ok), ValueError, "1-D integer tensor"),
        ("inputs/targets length mismatch", ul("neggrad", lambda c: c.batches(y=c.y[:3]), ok), ValueError,
         "same batch size"),
        ("forget is not batches", lambda c: unlearn(c.model, "neggrad", forget=5, retain=ok(c)), TypeError,
         "forget must be an iterable"),
        ("model is not a module", lambda c: unlearn("model", "neggrad", forget=ok(c), retain=ok(c)), TypeError,
         "model must be an nn.Module"),
        ("muso w0 of the wrong shape", ul("muso", ok, ok, w0=torch.zeros(10, 3)), ValueError,
         r"w0 must have shape \[10, 17\]"),
        ("muso singular Gram, no ridge", lambda c: __import__("unlearn_ext.methods.muso", fromlist=["x"])
         .retain_projector(torch.zeros(3, 3), 0.0), ValueError, "eps must be a positive finite ridge"),
        ("negative learning rate", ul("neggrad", ok, ok, lr=-1.0), ValueError, "neggrad: lr must be a positive"),
        ("zero epochs", ul("finetune", ok, ok, epochs=0), ValueError, "finetune: epochs must be a positive integer"),
        ("fractional epochs", ul("scrub", ok, ok, epochs=2.5), ValueError, "scrub: epochs must be a positive integer"),
        ("muso_linear forget mask longer than the data", lambda c: _muso_linear(torch.ones(12, dtype=torch.bool)),
         ValueError, r"forget_mask must be a bool tensor \[10\]"),
        ("muso_linear forget set = all data", lambda c: _muso_linear(torch.ones(10, dtype=torch.bool)), ValueError,
         "nothing would be retained"),
        ("opc negative norm weight", ul("opc", ok, ok, norm_weight=-1.0), ValueError, "norm_weight must be >= 0"),
        ("mnemonic without codes", lambda c: unlearn(build_model("mlp", (1, 8, 8), 10, hidden=16), "mnemonic",
         forget=ok(c), retain=ok(c)), ValueError, "needs the model's mnemonic codes"),
        ("evaluate unknown split", lambda c: evaluate(c.model, {"forget": ok(c), "valid": ok(c)}), ValueError,
         r"unknown split name\(s\) \['valid'\]"),
        ("evaluate without forget split", lambda c: evaluate(c.model, {"retain": ok(c)}), ValueError,
         "must contain 'forget'"),
        ("average_gap non-finite", lambda c: average_gap({"test_acc": float("nan")}, {"test_acc": 0.5}), ValueError,
         "not finite"),
    ]  # fmt: skip


def _data_checkpoint_cases():
    ds = load_dataset("digits", seed=0)

    def truncated(c):
        data = c.checkpoint.read_bytes()
        return load_checkpoint(c.write("truncated.safetensors", data[: len(data) // 3]))

    def nan_weights(c):
        model, _ = load_checkpoint(c.checkpoint)
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
        return load_checkpoint(c.write("nan.safetensors", checkpoint_bytes(model)))

    def foreign(c):
        from safetensors.torch import save

        return load_checkpoint(c.write("foreign.safetensors", save({"w": torch.zeros(2)})))

    return [
        ("forget every class", lambda c: make_forget_split(ds, classes=range(10)), ValueError, "nothing is retained"),
        ("fraction above 1", lambda c: make_forget_split(ds, fraction=1.5), ValueError, r"fraction must be in \(0,"),
        ("class that does not exist", lambda c: make_forget_split(ds, classes=11), ValueError,
         "class 11 does not exist"),
        ("both classes and fraction", lambda c: make_forget_split(ds, classes=1, fraction=0.1), ValueError,
         "exactly one of"),
        ("sample ids = whole training set", lambda c: forget_split_from_ids(ds, range(len(ds.y_train))), ValueError,
         "nothing is retained"),
        ("sample id out of range", lambda c: forget_split_from_ids(ds, [0, 10**6]), ValueError,
         "are not training samples"),
        ("truncated checkpoint", truncated, ValueError, "corrupt or truncated"),
        ("checkpoint with NaN weights", nan_weights, ValueError, "contain NaN or inf"),
        ("foreign safetensors file", foreign, ValueError, "not an unlearn_ext checkpoint"),
        ("missing checkpoint", lambda c: load_checkpoint(c.tmp / "none.safetensors"), FileNotFoundError,
         "no checkpoint at"),
        ("save a model without config", lambda c: save_checkpoint(nn.Linear(2, 2), c.tmp / "x.safetensors"),
         ValueError, "needs a model built by"),
    ]  # fmt: skip


def _request_cli_cases():
    def apply(c, req, **kw):
        return apply_requests(c.checkpoint, [c.write("req.json", req)], c.tmp / "out.safetensors", **kw)

    def req(c, **over):
        return {**c.request, **over}

    return [
        ("request class as a string", lambda c: parse_request(req(c, forget={"classes": ["3"]})), RequestError,
         "must be an integer"),
        ("request gates not an object", lambda c: parse_request(req(c, gates=[0.1])), RequestError,
         "gates must be an object"),
        ("request id not a string", lambda c: parse_request(req(c, request_id=7)), RequestError,
         "request_id must be a string"),
        ("request hparams of wrong type", lambda c: parse_request(req(c, hparams={"lr": {"v": 1}})), RequestError,
         "hparams.lr must be a JSON number"),
        ("request unknown class", lambda c: apply(c, req(c, forget={"classes": [42]})), RequestError,
         r"unknown class\(es\) \[42\]"),
        ("request file not JSON", lambda c: apply_requests(c.checkpoint, [c.write("r.json", "{oops")],
         c.tmp / "o.safetensors"), RequestError, "not valid JSON"),
        ("request config mismatch", lambda c: apply(c, req(c, model={"arch": "cnn"})), RequestError,
         "expects model arch='cnn'"),
        ("cli unknown method", lambda c: c.cli("run", "--method", "nope", "--forget-class", "0", "--out",
         str(c.tmp / "run")), SystemExit, "2"),
        ("cli forget fraction 2", lambda c: c.cli("run", "--method", "finetune", "--forget-fraction", "2",
         "--dataset", "digits", "--out", str(c.tmp / "run")), SystemExit, "2"),
        ("cli demo unknown class", lambda c: c.cli("demo", "--forget-class", "99", "--dataset", "digits",
         "--out", str(c.tmp / "demo")), SystemExit, "2"),
        ("cli apply missing checkpoint", lambda c: c.cli("apply", "--checkpoint", str(c.tmp / "none.safetensors"),
         "--request", str(c.write("r.json", c.request)), "--out", str(c.tmp / "o.safetensors")), SystemExit, "2"),
        ("cli apply request wrong types", lambda c: c.cli("apply", "--checkpoint", str(c.checkpoint), "--request",
         str(c.write("r.json", req(c, forget={"classes": "3"}))), "--out", str(c.tmp / "o.safetensors")),
         SystemExit, "2"),
        ("cli apply onto its input", lambda c: c.cli("apply", "--checkpoint", str(c.checkpoint), "--request",
         str(c.write("r.json", c.request)), "--out", str(c.checkpoint)), SystemExit, "2"),
    ]  # fmt: skip


CASES = [*_ops_cases(), *_fisher_method_eval_cases(), *_data_checkpoint_cases(), *_request_cli_cases()]


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_suite_is_large_and_ids_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) >= 40 and len(set(ids)) == len(ids)


@pytest.mark.parametrize(("call", "exc", "pattern"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_a_clear_error_and_changes_nothing(trained, tmp_path, capsys, call, exc, pattern):
    model, checkpoint = trained
    ckpt_sha = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    request = {"request_id": "bad-1", "forget": {"classes": [3]}, "method": "neggrad", "hparams": {"epochs": 1}}
    ctx = Ctx(tmp_path, model, checkpoint, request)
    before = _snapshot(tmp_path)
    written_by_case: set[str] = set()

    original_write = ctx.write

    def tracking_write(name, content):  # inputs the case itself prepares are not outputs
        written_by_case.add(name)
        return original_write(name, content)

    ctx.write = tracking_write
    with pytest.raises(exc) as info:
        call(ctx)
    message = str(info.value) if exc is not SystemExit else str(info.value.code)
    if exc is SystemExit:
        err = capsys.readouterr().err
        assert "error" in err.lower(), err  # the CLI names the problem on stderr
    assert pattern == "" or __import__("re").search(pattern, message), message
    after = {k: v for k, v in _snapshot(tmp_path).items() if k not in written_by_case}
    assert after == before, f"files created or changed: {set(after.items()) ^ set(before.items())}"
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == ckpt_sha
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()), "the given model was modified"
