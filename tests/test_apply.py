"""`unlearn apply`: deletion requests on checkpoints — gates, atomic publication, audit, idempotency,
lock, and SIGKILL at every step leaving the input, earlier outputs and the audit log intact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _utils import run_cli

from unlearn_ext.cli import main as cli_main
from unlearn_ext.data import load_dataset
from unlearn_ext.models import TrainConfig, load_checkpoint, save_checkpoint, train_classifier
from unlearn_ext.production import (
    AuditError,
    LockedError,
    OutputLock,
    RequestError,
    apply_requests,
    load_requests,
    merge_requests,
    parse_request,
    read_audit,
    sha256_file,
)
from unlearn_ext.production.apply import CRASH_POINTS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    ds = load_dataset("digits", seed=0)
    model = train_classifier(
        "mlp", ds.x_train, ds.y_train, num_classes=10, config=TrainConfig(epochs=15, lr=0.05), hidden=64
    )
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_checkpoint(model, path, metadata={"dataset": {"name": "digits", "seed": 0}})
    return path


def request(rid: str = "r1", **overrides) -> dict:
    base = {
        "request_id": rid,
        "forget": {"classes": [3]},
        "method": "neggrad",
        "hparams": {"epochs": 3, "lr": 0.1},
        "gates": {"max_forget_acc": 0.3, "max_retain_drop": 0.2},
    }
    base.update(overrides)
    return base


def write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def test_apply_publishes_a_verified_checkpoint_and_audits_it(checkpoint, tmp_path):
    before = sha256_file(checkpoint)
    req = write(tmp_path / "req.json", request())
    out = tmp_path / "out" / "model.safetensors"
    result = apply_requests(checkpoint, [req], out)
    assert result.status == "published", result.gates
    assert sha256_file(checkpoint) == before  # the input is only read
    assert sha256_file(out) == result.output_sha256
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    model, record = load_checkpoint(out)
    history = record["metadata"]["unlearn_history"]
    assert history[-1]["request_ids"] == ["r1"] and history[-1]["input_sha256"] == before
    assert result.metrics_after["forget_acc"] <= 0.3 < result.metrics_before["forget_acc"]
    events = read_audit(out.parent / "unlearn-audit.jsonl")
    assert [e["event"] for e in events] == ["intent", "published"]
    intent = events[0]
    assert intent["input"]["sha256"] == before and intent["output"]["sha256"] == result.output_sha256
    assert intent["method"] == "neggrad" and intent["hparams"] == {"epochs": 3, "lr": 0.1}
    assert set(intent["metrics_before"]) >= {"forget_acc", "retain_acc", "test_acc", "forget_class_test_acc", "mia"}
    assert intent["gates"]["max_forget_acc"]["pass"] and "versions" in intent and "durations_s" in intent
    # The published model is the one evaluated: its forget accuracy matches the audit's.
    ds = load_dataset("digits", seed=0)
    keep = ds.y_train == 3
    with torch.no_grad():
        acc = (model(ds.x_train[keep]).argmax(1) == 3).float().mean().item()
    assert acc == pytest.approx(result.metrics_after["forget_acc"], abs=1e-6)


def test_rerun_of_a_published_request_is_a_noop_reporting_the_earlier_result(checkpoint, tmp_path):
    req = write(tmp_path / "req.json", request())
    out = tmp_path / "model.safetensors"
    first = apply_requests(checkpoint, [req], out)
    mtime = out.stat().st_mtime_ns
    again = apply_requests(checkpoint, [req], out)
    assert again.status == "noop" and again.earlier["run_id"] == first.run_id
    assert again.output_sha256 == first.output_sha256 and again.earlier["output_state"] == "in place"
    assert out.stat().st_mtime_ns == mtime
    assert [e["event"] for e in read_audit(tmp_path / "unlearn-audit.jsonl")] == ["intent", "published", "noop"]
    # Same id, other content: refused.
    changed = write(tmp_path / "changed.json", request(hparams={"epochs": 1, "lr": 0.1}))
    with pytest.raises(RequestError, match="already applied .* different content"):
        apply_requests(checkpoint, [changed], out, overwrite=True)
    # One done, one new: refused (the input lacks the earlier deletion).
    both = write(tmp_path / "both.json", [request(), request("r2", forget={"classes": [5]})])
    with pytest.raises(RequestError, match=r"\['r1'\] were already applied"):
        apply_requests(checkpoint, [both], tmp_path / "other.safetensors")


def test_a_request_published_for_one_model_is_applied_to_another(checkpoint, tmp_path):
    """The same request id on a different input model runs (that model still holds the data); on the
    model it was published for it stays a no-op; other content under that id is refused for both."""
    req = write(tmp_path / "req.json", request())
    first = apply_requests(checkpoint, [req], tmp_path / "a.safetensors")
    model, record = load_checkpoint(checkpoint)
    with torch.no_grad():
        next(model.parameters()).mul_(1.01)  # another deployed model (same config)
    other = tmp_path / "other-input.safetensors"
    save_checkpoint(model, other, metadata=record["metadata"])
    second = apply_requests(other, [req], tmp_path / "b.safetensors")
    assert first.status == second.status == "published" and (tmp_path / "b.safetensors").is_file()
    assert second.input_sha256 == sha256_file(other) != first.input_sha256
    assert apply_requests(checkpoint, [req], tmp_path / "a.safetensors").status == "noop"
    assert apply_requests(other, [req], tmp_path / "b.safetensors").status == "noop"
    changed = write(tmp_path / "changed.json", request(hparams={"epochs": 1, "lr": 0.1}))
    with pytest.raises(RequestError, match="different content"):
        apply_requests(other, [changed], tmp_path / "c.safetensors")


def test_paths_are_audited_resolved_and_only_this_outputs_leftovers_are_removed(checkpoint, tmp_path, monkeypatch):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    own = tmp_path / "real" / ".m.safetensors.ab12_xyz.tmp"  # what mkstemp would name for m.safetensors
    others = [tmp_path / "real" / ".m.safetensors.v2.ab12xyz9.tmp", tmp_path / "real" / ".m.safetensors.x.tmp"]
    for p in (own, *others):
        p.write_bytes(b"partial")
    monkeypatch.chdir(tmp_path / "link")
    result = apply_requests(checkpoint, [write(tmp_path / "r.json", request())], "m.safetensors")
    assert result.status == "published"
    assert not own.exists() and all(p.exists() for p in others)
    intent = read_audit(tmp_path / "real" / "unlearn-audit.jsonl")[0]
    assert intent["output"]["path"] == str(tmp_path.resolve() / "real" / "m.safetensors")
    assert intent["input"]["path"] == str(checkpoint.resolve())


def test_a_crash_under_one_spelling_of_the_output_is_recovered_under_another(checkpoint, tmp_path):
    req = write(tmp_path / "r1.json", request())
    args = ["apply", "--checkpoint", str(checkpoint), "--request", str(req), "--no-progress", "--out"]
    proc = run_cli([*args, "m.safetensors"], "replaced", timeout=300, cwd=tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    proc = run_cli([*args, str(tmp_path / "m.safetensors")], None, timeout=300)
    assert proc.returncode == 0, proc.stderr
    events = [(e["event"], e.get("recovered", False)) for e in read_audit(tmp_path / "unlearn-audit.jsonl")]
    assert events == [("intent", False), ("published", True), ("noop", False)]  # not unlearned twice


def test_apply_json_prints_one_json_document(checkpoint, tmp_path):
    req = write(tmp_path / "r.json", request())
    args = ["apply", "--checkpoint", str(checkpoint), "--request", str(req), "--out", str(tmp_path / "m.safetensors")]
    proc = run_cli([*args, "--json", "--no-progress"], None, timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # nothing else on stdout
    assert doc["status"] == "published" and doc["output_sha256"] == sha256_file(tmp_path / "m.safetensors")


def test_a_failure_while_publishing_is_audited_and_publishes_nothing(checkpoint, tmp_path, monkeypatch):
    import unlearn_ext.models.checkpoint as ckpt

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "atomic_write_bytes", full_disk)
    out = tmp_path / "m.safetensors"
    with pytest.raises(OSError, match="No space"):
        apply_requests(checkpoint, [write(tmp_path / "r.json", request())], out)
    assert not out.exists()
    events = read_audit(tmp_path / "unlearn-audit.jsonl")
    assert [e["event"] for e in events] == ["intent", "aborted"] and "No space" in events[1]["error"]
    monkeypatch.undo()  # the next run publishes (the closed intent is not re-closed)
    assert apply_requests(checkpoint, [write(tmp_path / "r.json", request())], out).status == "published"
    assert [e["event"] for e in read_audit(tmp_path / "unlearn-audit.jsonl")][2:] == ["intent", "published"]


def test_overwriting_an_output_that_carries_other_deletions_is_refused(checkpoint, tmp_path):
    out = tmp_path / "model.safetensors"
    assert apply_requests(checkpoint, [write(tmp_path / "a.json", request("a"))], out).status == "published"
    before = sha256_file(out)
    other = write(tmp_path / "b.json", request("b", forget={"classes": [5]}))
    with pytest.raises(RequestError, match=r"carries published deletion requests \['a'\].*use that output"):
        apply_requests(checkpoint, [other], out, overwrite=True)  # from the original: would bring 'a' back
    assert sha256_file(out) == before
    derived = tmp_path / "derived.safetensors"
    derived.write_bytes(out.read_bytes())
    result = apply_requests(derived, [other], out, overwrite=True)  # derived from it: allowed
    history = load_checkpoint(out)[1]["metadata"]["unlearn_history"]
    assert result.status == "published" and [h["request_ids"] for h in history] == [["a"], ["b"]]
    # A request already in the input's lineage is refused even with another audit log.
    with pytest.raises(RequestError, match=r"\['a'\] were already applied to .*unlearn_history"):
        apply_requests(out, [write(tmp_path / "a2.json", request("a"))], tmp_path / "x.safetensors",
                       audit=tmp_path / "other-audit.jsonl")  # fmt: skip
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "other-audit.jsonl").exists()


def test_failed_gate_publishes_nothing_and_exits_3(checkpoint, tmp_path, capsys):
    req = write(tmp_path / "req.json", request(gates={"max_forget_acc": 0.0, "max_retain_drop": 0.0}))
    out = tmp_path / "model.safetensors"
    args = ["apply", "--checkpoint", str(checkpoint), "--request", str(req), "--out", str(out), "--no-progress"]
    code = cli_main(args)
    assert code == 3
    assert "rejected" in capsys.readouterr().err
    assert not out.exists()
    events = read_audit(tmp_path / "unlearn-audit.jsonl")
    assert [e["event"] for e in events] == ["rejected"]
    assert set(events[0]["failed_gates"]) <= {"max_forget_acc", "max_retain_drop"} and events[0]["failed_gates"]
    # A rejected request may be re-filed (e.g. with other hyperparameters): it was never published.
    ok = write(tmp_path / "ok.json", request())
    assert apply_requests(checkpoint, [ok], out).status == "published"


def test_merged_requests_forget_the_union_with_the_strictest_gates(checkpoint, tmp_path):
    reqs = [
        parse_request(request("a", forget={"sample_ids": [0, 5, 9]}, gates={"max_retain_drop": 0.2})),
        parse_request(request("b", forget={"sample_ids": [9, 11]}, gates={"max_retain_drop": 0.1})),
    ]
    merged = merge_requests(reqs)
    assert merged.sample_ids == (0, 5, 9, 11) and merged.gates == {"max_retain_drop": 0.1}
    result = apply_requests(checkpoint, reqs, tmp_path / "m.safetensors")
    intent = read_audit(tmp_path / "unlearn-audit.jsonl")[0]
    assert intent["forget"]["num_forget"] == 4 and intent["forget"]["sample_ids"] == [0, 5, 9, 11]
    assert result.request_ids == ["a", "b"]
    with pytest.raises(RequestError, match="different methods"):
        other = request("c", forget={"sample_ids": [1]}, method="finetune", hparams={})
        merge_requests([reqs[0], parse_request(other)])
    with pytest.raises(RequestError, match="kinds of forget set"):
        merge_requests([reqs[0], parse_request(request("d"))])


def test_apply_errors_are_clear_and_write_nothing(checkpoint, tmp_path):
    out = tmp_path / "o.safetensors"
    cases = [
        (request(forget={"classes": [12]}), RequestError, r"unknown class\(es\) \[12\]"),
        (request(forget={"sample_ids": [10**6]}), RequestError, "are not training samples"),
        (request(dataset={"name": "mnist"}), RequestError, "trained on 'digits'"),
        (request(model={"arch": "cnn"}), RequestError, "expects model arch='cnn'"),
        (request(model={"hidden": 999}), RequestError, "hidden=999"),
        (
            request(forget={"concept": "cat", "image": "cat.png"}, method="siu", hparams={}, gates={}),
            RequestError,
            "classifier checkpoint: concept requests need a multimodal checkpoint",
        ),
        # Hyperparameter values are checked here, before the lock, not when unlearning starts.
        (request(hparams={"epochs": 3, "lr": -0.1}), RequestError, "method 'neggrad': .*lr"),
        (request(hparams={"epochs": 0}), RequestError, "method 'neggrad': .*epochs"),
    ]
    for i, (obj, exc, pattern) in enumerate(cases):
        with pytest.raises(exc, match=pattern):
            apply_requests(checkpoint, [write(tmp_path / f"r{i}.json", obj)], out)
        assert not out.exists()
    with pytest.raises(RequestError, match="is the input checkpoint"):
        apply_requests(checkpoint, [write(tmp_path / "x.json", request())], checkpoint)
    out.write_bytes(b"earlier")
    with pytest.raises(RequestError, match="exists: pass overwrite"):
        apply_requests(checkpoint, [write(tmp_path / "y.json", request())], out)
    assert out.read_bytes() == b"earlier"
    # Bad input is found before anything is written: no audit record, no lock file.
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".json")) == ["o.safetensors"]


def test_a_failure_while_unlearning_is_audited(checkpoint, tmp_path):
    diverge = write(tmp_path / "r.json", request(method="finetune", hparams={"epochs": 1, "lr": 1e30}))
    with pytest.raises(FloatingPointError, match="diverged"):
        apply_requests(checkpoint, [diverge], tmp_path / "o.safetensors")
    (failed,) = read_audit(tmp_path / "unlearn-audit.jsonl")
    assert failed["event"] == "failed" and failed["stage"] == "unlearn" and "diverged" in failed["error"]
    assert not (tmp_path / "o.safetensors").exists()


def test_a_divergence_is_a_clear_cli_error_not_a_traceback(checkpoint, tmp_path):
    diverge = write(tmp_path / "r.json", request(method="finetune", hparams={"epochs": 1, "lr": 1e30}))
    args = ["apply", "--checkpoint", str(checkpoint), "--request", str(diverge), "--no-progress"]
    proc = run_cli([*args, "--out", str(tmp_path / "o.safetensors")], None, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "unlearn apply: error: " in proc.stderr and "diverged" in proc.stderr
    assert "Traceback" not in proc.stderr and "nothing was published" in proc.stderr
    assert [e["event"] for e in read_audit(tmp_path / "unlearn-audit.jsonl")] == ["failed"]


def test_the_audit_records_every_hyperparameter_used(checkpoint, tmp_path):
    from unlearn_ext.methods import get_method

    result = apply_requests(checkpoint, [write(tmp_path / "r.json", request())], tmp_path / "o.safetensors")
    intent = next(e for e in read_audit(result.audit) if e["event"] == "intent")
    assert intent["hparams"] == {"epochs": 3, "lr": 0.1}  # what the request said
    effective = get_method("neggrad", seed=intent["seed"], epochs=3, lr=0.1).hparams()
    assert intent["method_hparams"] == json.loads(json.dumps(effective)) and len(effective) > 2


def test_checkpoints_the_audit_cannot_verify_are_refused(checkpoint, tmp_path):
    from safetensors.torch import load, save

    from unlearn_ext.models.checkpoint import tensors_digest

    data = checkpoint.read_bytes()
    tensors = load(data)
    record = json.loads(json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]["unlearn_ext"])
    req = write(tmp_path / "req.json", request())
    for name, change, exc, pattern in [
        ("no-checksum", lambda r: r.pop("tensors_sha256"), RequestError, "no tensor checksum"),
        ("metadata-list", lambda r: r.update(metadata=[1]), ValueError, "corrupt unlearn_ext metadata"),
        ("dataset-string", lambda r: r["metadata"].update(dataset="digits"), RequestError, "dataset record"),
        ("history-odd", lambda r: r["metadata"].update(unlearn_history="x"), None, None),
        ("float64", None, ValueError, "float64 parameters.*convert it explicitly"),
    ]:
        r = json.loads(json.dumps(record))
        t = tensors
        if change is None:  # float64 parameters: apply would publish a float32 checkpoint
            t = {k: v.double() if v.is_floating_point() else v for k, v in tensors.items()}
            r["tensors_sha256"] = tensors_digest(t)
        else:
            change(r)
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(save(t, metadata={"unlearn_ext": json.dumps(r)}))
        out = tmp_path / f"{name}-out.safetensors"
        if exc is None:  # a malformed lineage is no lineage, not a crash
            assert apply_requests(bad, [req], out).status == "published"
            continue
        with pytest.raises(exc, match=pattern):
            apply_requests(bad, [req], out)
        assert not out.exists()


def test_corrupt_truncated_and_foreign_checkpoints(checkpoint, tmp_path):
    data = checkpoint.read_bytes()
    req = write(tmp_path / "req.json", request())
    for name, blob, pattern in [
        ("truncated", data[: len(data) // 2], "corrupt or truncated"),
        ("garbage", b"\x00" * 64, "corrupt or truncated"),
        ("flipped", data[:-40] + bytes(b ^ 0xFF for b in data[-40:]), "checksum recorded"),
    ]:
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(blob)
        with pytest.raises(ValueError, match=pattern):
            apply_requests(bad, [req], tmp_path / f"{name}-out.safetensors")
        assert not (tmp_path / f"{name}-out.safetensors").exists()
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign))
    with pytest.raises(ValueError, match="not an unlearn_ext checkpoint"):
        apply_requests(foreign, [req], tmp_path / "f-out.safetensors")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        apply_requests(tmp_path / "missing.safetensors", [req], tmp_path / "m-out.safetensors")


def test_request_validation_names_the_problem(tmp_path):
    bad = [
        ({"forget": {"classes": [1]}, "method": "neggrad"}, "request_id must be"),
        (request(rid="has space"), "request_id must be"),
        (request(colour="red"), r"unknown key\(s\) \['colour'\]"),
        ({"request_id": "x", "method": "neggrad"}, "missing required key 'forget'"),
        (request(forget={"classes": []}), "forget.classes is empty"),
        (request(forget={"classes": ["3"]}), "must be an integer"),
        (request(forget={"classes": [True]}), "must be an integer"),
        (request(forget={"classes": [1], "sample_ids": [2]}), "exactly one of"),
        (request(forget={"sample_ids": [-1]}), "non-negative"),
        (request(forget={"concept": "cat"}), "needs forget.image"),
        (request(method="forget_everything"), "unknown unlearning method"),
        (request(method="siu"), "visual concept"),
        (request(hparams={"epoch": 2}), r"no hyperparameter\(s\) \['epoch'\]"),
        (request(hparams={"lr": float("nan")}), "not finite"),
        (request(gates={"max_forget_acc": 5}), r"number in \[0, 1\]"),
        (request(gates={"max_forget": 0.1}), r"unknown gate\(s\)"),
        (request(gates={"max_forget_acc": "low"}), r"number in \[0, 1\]"),
        (request(forget={"sample_ids": [1]}, gates={"max_forget_class_test_acc": 0.1}), "needs a class request"),
        (request(dataset={"name": "cifar"}), "unknown dataset 'cifar'"),
        (request(seed="0"), "seed must be an integer"),
        ([], "must be a JSON object"),
    ]
    for obj, pattern in bad:
        with pytest.raises(RequestError, match=pattern):
            parse_request(obj)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(RequestError, match="not valid JSON"):
        load_requests([tmp_path / "bad.json"])
    write(tmp_path / "dup.json", [request("same"), request("same")])
    with pytest.raises(RequestError, match="appears twice"):
        load_requests([tmp_path / "dup.json"])
    with pytest.raises(FileNotFoundError, match="no request file"):
        load_requests([tmp_path / "nope.json"])


def test_lock_stops_a_second_apply(checkpoint, tmp_path):
    out = tmp_path / "model.safetensors"
    with OutputLock(out):
        with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
            apply_requests(checkpoint, [write(tmp_path / "r.json", request())], out)
    assert not out.exists()
    # A lock held by a process that then dies is released by the kernel.
    script = f"from unlearn_ext.production import OutputLock; import os, signal; OutputLock({str(out)!r}).acquire(); os.kill(os.getpid(), signal.SIGKILL)"  # noqa: E501
    subprocess.run([sys.executable, "-c", script], check=False)
    with OutputLock(out):
        pass


def test_damaged_audit_log_is_refused_and_a_torn_last_line_is_skipped(checkpoint, tmp_path):
    audit = tmp_path / "unlearn-audit.jsonl"
    audit.write_text('{"event": "noop", "run_id": "x"}\n{"event": "intent", "run')  # torn last line
    with pytest.warns(UserWarning, match="incomplete last record"):
        assert len(read_audit(audit)) == 1
    with pytest.warns(UserWarning):
        apply_requests(checkpoint, [write(tmp_path / "r.json", request())], tmp_path / "m.safetensors")
    lines = audit.read_text().splitlines()
    assert lines[1] == '{"event": "intent", "run'  # old bytes untouched, new records on fresh lines
    assert [json.loads(x)["event"] for x in lines[2:]] == ["repair", "intent", "published"]
    # The repair record marks the fragment: the log stays readable and usable afterwards.
    assert [e["event"] for e in read_audit(audit)] == ["noop", "repair", "intent", "published"]
    again = apply_requests(checkpoint, [write(tmp_path / "r3.json", request("r3"))], tmp_path / "m3.safetensors")
    assert again.status == "published" and read_audit(audit)[-1]["event"] == "published"
    # A damaged line with no repair record after it is still refused, wherever it is.
    audit.write_text('{"event": "noop"}\n{"event": "int\n{"event": "noop"}\n')
    with pytest.raises(AuditError, match="line 2"):
        read_audit(audit)
    audit.write_text('{"event": "noop"}\ngarbage\n{"event": "noop"}\n')
    with pytest.raises(AuditError, match="line 2"):
        apply_requests(checkpoint, [write(tmp_path / "r2.json", request("r2"))], tmp_path / "m2.safetensors")


@pytest.mark.parametrize("crash_at", CRASH_POINTS)
def test_sigkill_at_each_step_leaves_everything_intact(checkpoint, tmp_path, crash_at):
    """Kill apply at each step while it replaces an earlier output: the input, the earlier output (or
    the complete new one) and the audit log stay intact; a rerun recovers and finishes the request."""
    out = tmp_path / "model.safetensors"
    r0 = request("r0", forget={"sample_ids": [1, 2]}, method="finetune", hparams={"epochs": 1, "lr": 0.01}, gates={})
    r0 = write(tmp_path / "r0.json", r0)
    first = apply_requests(checkpoint, [r0], out)
    assert first.status == "published"
    # The next input derives from the published output (replacing it with a model lacking r0 is refused).
    checkpoint = tmp_path / "v1.safetensors"
    checkpoint.write_bytes(out.read_bytes())
    input_sha, earlier_sha = sha256_file(checkpoint), first.output_sha256
    req = write(tmp_path / "r1.json", request())
    args = [
        "apply",
        "--checkpoint",
        str(checkpoint),
        "--request",
        str(req),
        "--out",
        str(out),
        "--overwrite",
        "--no-progress",
    ]  # noqa: E501
    proc = run_cli(args, crash_at, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert sha256_file(checkpoint) == input_sha
    records = read_audit(tmp_path / "unlearn-audit.jsonl")  # parseable
    intents = [r for r in records if r["event"] == "intent" and r["request_ids"] == ["r1"]]
    now = sha256_file(out)
    if crash_at in ("replaced", "published"):
        assert now == intents[0]["output"]["sha256"]  # the new checkpoint, complete
    else:
        assert now == earlier_sha  # the earlier output, untouched
    load_checkpoint(out)
    assert not list(tmp_path.glob("*.tmp")) or crash_at == "temp_written"
    # A rerun recovers: closes the open intent, removes leftovers, and ends with r1 published once.
    proc = run_cli(args, None, timeout=300)
    assert proc.returncode == 0, proc.stderr
    records = read_audit(tmp_path / "unlearn-audit.jsonl")
    published = [r for r in records if r["event"] == "published" and r["request_ids"] == ["r1"]]
    assert len(published) == 1
    assert (crash_at in ("replaced",)) == bool(published[0].get("recovered"))
    if crash_at == "published":
        assert records[-1]["event"] == "noop"
    assert not list(tmp_path.glob(".*.tmp"))
    assert sha256_file(out) == published[0]["output"]["sha256"]
    assert sha256_file(checkpoint) == input_sha
