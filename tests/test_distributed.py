"""Data parallelism (unlearn_ext.distributed): 2 CPU processes, gloo on 127.0.0.1, compared with one process.

Each test starts 2 processes once (``torch.multiprocessing.spawn``) and runs several cases in them:
every worker computes the distributed result AND the single-process reference on the same global
data, and saves both; the test process compares them (and the two ranks with each other).

* The diagonal Fisher is a sum: sharded with no padding it equals the single-process Fisher up to
  float rounding, for uneven shards, an empty rank, per-class groups and batch granularity; the
  reductions are one ``all_reduce`` per bucket (counted by wrapping ``dist.all_reduce``).
* Fine-tuning methods under DDP and FSDP2: the global batches have sizes divisible by the world size,
  so a step on the 2 shards averages two equal-sized means, i.e. the single-process step on the whole
  batch; after two epochs the weights match to 1e-9 (float64).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

from _spawn import run_ranks  # noqa: E402
from torch import nn  # noqa: E402

WORLD = 2
ATOL64 = 1e-9


def _run(fn, tmp_path) -> list[dict]:
    return run_ranks(fn, WORLD, tmp_path)


def _close(a, b, atol: float, rtol: float = 0.0, what: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            _close(a[k], b[k], atol, rtol, f"{what}[{k}]")
        return
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, atol, rtol, f"{what}[{i}]")
        return
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")
        return
    assert a == b, f"{what}: {a!r} != {b!r}"


# --------------------------------------------------------------------------------------------
# Workers (module level, they run in the spawned processes)
# --------------------------------------------------------------------------------------------


def _net(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 5)).to(dtype)


def _data(n: int, dtype=torch.float64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 5, (n,), generator=g)


class _CountingAllReduce:
    """Wraps ``dist.all_reduce`` to count the collectives."""

    def __init__(self) -> None:
        self.calls = 0
        self.original = dist.all_reduce

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.original(*args, **kwargs)

    def __enter__(self):
        dist.all_reduce = self
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self.original


def _fisher_worker(rank: int, world: int) -> dict:
    from unlearn_ext.data import TensorBatches
    from unlearn_ext.distributed import (
        all_reduce_buckets,
        distributed_diagonal_fisher,
        is_distributed,
        shard_batches,
    )
    from unlearn_ext.distributed import rank as get_rank
    from unlearn_ext.distributed import world_size as get_world_size
    from unlearn_ext.fisher import diagonal_fisher

    out: dict = {"info": (is_distributed(), get_rank(), get_world_size())}
    model = _net().eval()
    x, y = _data(13)

    def batches(bs=4, n=13):  # 4, 4, 4, 1 samples: the last batch leaves rank 1 nothing
        return TensorBatches(x[:n], y[:n], batch_size=bs, shuffle=True, seed=3)

    cases = {
        "sample": ({}, batches),
        "groups": ({"groups": "targets", "num_groups": 5}, batches),
        "batch_granularity": ({"granularity": "batch"}, batches),
        "one_sample": ({}, lambda: batches(n=1)),  # rank 1 has no sample at all
    }
    for name, (kw, make) in cases.items():
        with _CountingAllReduce() as counter:
            got = distributed_diagonal_fisher(model, make(), return_counts=True, **kw)
        out[name] = {"dist": got, "ref": diagonal_fisher(model, make(), return_counts=True, **kw)}
        out[name + "_calls"] = counter.calls

    # float32 (the main kernel path)
    m32 = _net(torch.float32).eval()
    x32, y32 = x.float(), y
    got = distributed_diagonal_fisher(m32, TensorBatches(x32, y32, batch_size=5))
    out["float32"] = {"dist": got, "ref": diagonal_fisher(m32, TensorBatches(x32, y32, batch_size=5))}

    # already-local batches (shard=False), as from a DataLoader over a DistributedSampler
    idx = torch.arange(13)[rank::world]
    local = TensorBatches(x[idx], y[idx], batch_size=3)
    out["local"] = {"dist": distributed_diagonal_fisher(model, local, shard=False), "ref": out["sample"]["ref"][0]}
    # Monte-Carlo labels: each rank draws its own (seed + rank); the reduced result is the same everywhere
    out["sampled"] = distributed_diagonal_fisher(model, batches(), labels="sampled")

    # bucket counts: 4 float64 Fisher tensors of 64, 384, 64, 64 (LayerNorm), 40, 320 bytes
    calls = {}
    for bucket_bytes in (2**25, 400, 1):
        with _CountingAllReduce() as counter:
            distributed_diagonal_fisher(model, batches(), bucket_bytes=bucket_bytes)
        calls[bucket_bytes] = counter.calls
    out["bucket_calls"] = calls
    out["sizes"] = [p.numel() * 8 for _, p in sorted(model.named_parameters())]

    # all_reduce_buckets itself: mixed dtypes, non-contiguous, in place
    ts = [
        torch.full((10,), float(rank + 1)),
        torch.full((3,), float(rank + 1), dtype=torch.float64),
        torch.full((5, 4), float(rank + 1)).t(),
        torch.full((2,), rank + 1, dtype=torch.long),
    ]
    with _CountingAllReduce() as counter:
        all_reduce_buckets(ts)
    out["mixed"] = {"tensors": ts, "calls": counter.calls}

    # sharding rules: DistributedSampler order per batch
    b = [(torch.arange(5), torch.arange(5))]
    out["shards"] = {
        u: [xs.tolist() for xs, _ in shard_batches(b, uneven=u, rank=rank, world_size=world)]
        for u in ("pad", "drop", "allow")
    }

    # a failure on one rank reaches every rank (nobody waits in a collective)
    bad_x = x.clone()
    if rank == 1:
        bad_x[:] = float("nan")
    try:
        distributed_diagonal_fisher(model, [(bad_x, y)], shard=False)
        out["error"] = None
    except (ValueError, RuntimeError) as e:
        out["error"] = (type(e).__name__, str(e))
    return out


def _classifier() -> nn.Module:
    from unlearn_ext.models import attach_initial_head, build_model

    torch.manual_seed(0)
    model = build_model("mlp", (6,), 4, hidden=12, activation="tanh").double()
    return attach_initial_head(model)  # MUSO's w0


def _split():
    g = torch.Generator().manual_seed(2)
    xf, yf = torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (16,), generator=g)
    xr, yr = torch.randn(32, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (32,), generator=g)
    return xf, yf, xr, yr


#: Methods and hyperparameters compared with one process (all deterministic given the data order).
_METHODS = {
    "finetune": {"epochs": 2, "lr": 0.05},
    "neggrad": {"epochs": 2, "lr": 0.02},
    "opc": {"epochs": 2, "lr": 0.05},
    "scrub": {"epochs": 2, "max_steps": 1, "lr": 0.02},
    "muso": {"epochs": 2, "lr": 1e-2},
    "muso:labels": {"epochs": 2, "lr": 1e-2, "targets": "labels"},  # Z^T Y summed over the ranks too
    "bad_teacher": {"epochs": 2, "lr": 0.05, "retain_fraction": 0.6},
}
_DDP_ONLY = {"retrain": {"epochs": 2, "lr": 0.05, "t_mix": 0.0}}
#: Random relabelling draws per shard, so no single-process equal: checked to run and agree over ranks.
_SMOKE = {"random_label": {"epochs": 1}, "salun": {"epochs": 1}}
_SMOKE_FSDP = {"random_label": {"epochs": 1}, "salun": {"epochs": 1}}


def _methods_worker(rank: int, world: int, strategy: str) -> dict:
    from unlearn_ext.data import TensorBatches
    from unlearn_ext.distributed import unlearn_distributed
    from unlearn_ext.methods import get_method

    model = _classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    xf, yf, xr, yr = _split()

    def data():  # global batches of 8 (4 per rank), shuffled, the same on every rank
        return TensorBatches(xf, yf, batch_size=8, shuffle=True, seed=5), TensorBatches(
            xr, yr, batch_size=8, shuffle=True, seed=6
        )

    out: dict = {}
    compared = {**_METHODS, **(_DDP_ONLY if strategy == "ddp" else {})}
    for name, hp in compared.items():
        method = name.split(":")[0]  # "method:variant" runs method with the variant's hyperparameters
        forget, retain = data()
        res = unlearn_distributed(model, method, forget=forget, retain=retain, strategy=strategy, **hp)
        forget, retain = data()
        ref = get_method(method, **hp).unlearn(model, forget, retain)
        out[name] = {
            "dist": {k: v.detach().clone() for k, v in res.model.state_dict().items()},
            "ref": {k: v.detach().clone() for k, v in ref.state_dict().items()},
            "plain": type(res.model).__name__,
            "log": res.log,
        }
    for name, hp in (_SMOKE if strategy == "ddp" else _SMOKE_FSDP).items():
        forget, retain = data()
        res = unlearn_distributed(model, name, forget=forget, retain=retain, strategy=strategy, **hp)
        out[name] = {k: v.detach().clone() for k, v in res.model.state_dict().items()}
    # SalUn's saliency mask is global (gradients summed over the shards): the weights it leaves
    # untouched must be exactly those the single-process run leaves untouched.
    forget, retain = data()
    ref = get_method("salun", **_SMOKE["salun"]).unlearn(model, forget, retain)
    out["salun_ref_moved"] = {k: v != model.state_dict()[k] for k, v in ref.state_dict().items()}
    out["untouched"] = all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())

    # inplace=True trains the given model (for FSDP2: the gathered weights are loaded back into it)
    target = _classifier()
    forget, retain = data()
    method = get_method("finetune", inplace=True, **_METHODS["finetune"])  # an Unlearner instance works too
    res = unlearn_distributed(target, method, forget=forget, retain=retain, strategy=strategy)
    out["inplace"] = {"same_object": res.model is target, "state": dict(target.state_dict()), "log": method.log}

    # an odd batch size: "pad" keeps the ranks in lockstep (repeated samples: no single-process equal)
    forget = TensorBatches(xf[:7], yf[:7], batch_size=7)
    res = unlearn_distributed(model, "neggrad_plus", forget=forget, retain=TensorBatches(xr, yr, batch_size=5),
                              strategy=strategy, epochs=1)  # fmt: skip
    out["padded"] = {k: v.detach().clone() for k, v in res.model.state_dict().items()}
    try:
        unlearn_distributed(model, "mnemonic", forget=forget, strategy=strategy)
        out["unsupported"] = None
    except NotImplementedError as e:
        out["unsupported"] = str(e)
    return out


def _ddp_worker(rank: int, world: int) -> dict:
    return _methods_worker(rank, world, "ddp")


def _fsdp_worker(rank: int, world: int) -> dict:
    return _methods_worker(rank, world, "fsdp")


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fisher_runs(tmp_path_factory):
    return _run(_fisher_worker, tmp_path_factory.mktemp("fisher"))


def test_process_group_helpers(fisher_runs):
    assert [r["info"] for r in fisher_runs] == [(True, 0, 2), (True, 1, 2)]


@pytest.mark.parametrize("case", ["sample", "groups", "batch_granularity", "one_sample", "float32", "local"])
def test_distributed_fisher_equals_single_process(fisher_runs, case):
    tol = {"float32": (1e-6, 1e-5)}.get(case, (1e-12, 1e-10))
    for r in fisher_runs:
        _close(r[case]["dist"], r[case]["ref"], *tol, what=case)
    _close(fisher_runs[0][case]["dist"], fisher_runs[1][case]["dist"], 0.0, what=f"{case} rank 0 vs 1")


def test_fisher_reduces_counts_and_sums_in_buckets(fisher_runs):
    for r in fisher_runs:
        # one int64 bucket (counts + error flags) and one float64 bucket for all the sums
        for case in ("sample", "groups", "batch_granularity", "one_sample"):
            assert r[case + "_calls"] == 2, case
        # greedy 400-byte buckets over [64, 384, 64, 64, 40, 320] bytes: [64] [384] [64 64 40] [320]
        assert r["sizes"] == [64, 384, 64, 64, 40, 320]
        assert r["bucket_calls"] == {2**25: 2, 400: 5, 1: 7}


def test_all_reduce_buckets_mixed_dtypes_in_place(fisher_runs):
    for r in fisher_runs:
        ts = r["mixed"]["tensors"]
        assert r["mixed"]["calls"] == 3  # float32 (2 tensors), float64, int64
        assert [t.dtype for t in ts] == [torch.float32, torch.float64, torch.float32, torch.long]
        for t in ts:
            assert torch.equal(t, torch.full_like(t, 3))
        assert ts[2].shape == (4, 5) and not ts[2].is_contiguous()


def test_shard_batches_follows_distributed_sampler(fisher_runs):
    # 5 samples over 2 ranks: pad repeats sample 0 (DistributedSampler, drop_last=False)
    assert fisher_runs[0]["shards"] == {"pad": [[0, 2, 4]], "drop": [[0, 2]], "allow": [[0, 2, 4]]}
    assert fisher_runs[1]["shards"] == {"pad": [[1, 3, 0]], "drop": [[1, 3]], "allow": [[1, 3]]}


def test_sampled_fisher_agrees_across_ranks(fisher_runs):
    _close(fisher_runs[0]["sampled"], fisher_runs[1]["sampled"], 0.0, what="sampled")
    assert all(bool((v > 0).any()) for v in fisher_runs[0]["sampled"].values())


def test_fisher_failure_on_one_rank_raises_on_every_rank(fisher_runs):
    kind0, msg0 = fisher_runs[0]["error"]
    kind1, msg1 = fisher_runs[1]["error"]
    assert kind1 == "ValueError" and "non-finite" in msg1
    assert kind0 == "RuntimeError" and "rank(s) [1]" in msg0


def _check_methods(runs, strategy):
    compared = {**_METHODS, **(_DDP_ONLY if strategy == "ddp" else {})}
    original = _classifier().state_dict()
    for r in runs:
        assert r["untouched"]
        assert r["inplace"]["same_object"] and len(r["inplace"]["log"]) == _METHODS["finetune"]["epochs"]
        _close(r["inplace"]["state"], r["finetune"]["dist"], 0.0, what="inplace")
        for name in compared:
            assert r[name]["plain"] != "DistributedDataParallel" and not r[name]["plain"].startswith("FSDP")
            _close(r[name]["dist"], r[name]["ref"], ATOL64, 1e-7, what=f"{strategy} {name}")
        assert "does not run under" in r["unsupported"]
    for name in compared:  # the same weights on both ranks, from different shards (rank-local losses)
        _close(runs[0][name]["dist"], runs[1][name]["dist"], 0.0, what=f"{name} rank 0 vs 1")
        assert runs[0][name]["log"] != runs[1][name]["log"], name
    for r in runs:
        for k, moved_ref in r["salun_ref_moved"].items():
            moved = r["salun"][k] != original[k]
            assert torch.equal(moved, moved_ref), f"{strategy} salun mask differs from one process at {k}"
    for name in ["padded", *(_SMOKE if strategy == "ddp" else _SMOKE_FSDP)]:
        _close(runs[0][name], runs[1][name], 0.0, what=f"{name} rank 0 vs 1")
        assert not torch.allclose(runs[0][name]["net.1.weight"], original["net.1.weight"]), name


@pytest.mark.slow
def test_ddp_methods_equal_single_process(tmp_path):
    _check_methods(_run(_ddp_worker, tmp_path), "ddp")


@pytest.mark.slow
def test_fsdp2_methods_equal_single_process(tmp_path):
    _check_methods(_run(_fsdp_worker, tmp_path), "fsdp")


def test_sharding_without_a_process_group():
    from unlearn_ext.distributed import ShardedBatches, is_distributed, rank, shard_batches, world_size

    assert not is_distributed() and rank() == 0 and world_size() == 1
    batches = [(torch.arange(6).view(6, 1), torch.arange(6)), (torch.arange(3).view(3, 1), torch.arange(3))]
    assert [y.tolist() for _, y in shard_batches(batches)] == [[0, 1, 2, 3, 4, 5], [0, 1, 2]]
    s = ShardedBatches(batches, rank=2, world_size=3, uneven="allow")
    assert [y.tolist() for _, y in s] == [[2, 5], [2]]
    assert len(ShardedBatches(batches, rank=1, world_size=3)) == 2
    assert [y.tolist() for _, y in ShardedBatches(batches, rank=1, world_size=2, mode="whole")] == [[0, 1, 2]]
    # Hugging Face style inputs: every tensor with the batch dimension is split
    hf = [({"input_ids": torch.arange(8).view(4, 2), "scale": torch.ones(1)}, torch.arange(4))]
    ((inputs, y),) = ShardedBatches(hf, rank=1, world_size=2)
    assert inputs["input_ids"].tolist() == [[2, 3], [6, 7]] and inputs["scale"].shape == (1,) and y.tolist() == [1, 3]
    with pytest.raises(ValueError, match="uneven"):
        ShardedBatches(batches, rank=0, world_size=2, uneven="repeat")
    with pytest.raises(ValueError, match="rank"):
        ShardedBatches(batches, rank=2, world_size=2)


def test_functions_need_a_process_group():
    from unlearn_ext.distributed import all_reduce_buckets, distributed_diagonal_fisher, unlearn_distributed

    with pytest.raises(RuntimeError, match="process group"):
        all_reduce_buckets([torch.zeros(2)])
    with pytest.raises(RuntimeError, match="process group"):
        distributed_diagonal_fisher(nn.Linear(2, 2), [])
    with pytest.raises(RuntimeError, match="process group"):
        unlearn_distributed(nn.Linear(2, 2), "finetune", forget=[], retain=[])


def test_default_fsdp_units_leave_the_head_in_the_root():
    from unlearn_ext.distributed import _default_fsdp_units

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.mlp = nn.Linear(4, 4), nn.Linear(4, 4)

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.blocks = nn.ModuleList([Block(), Block()])
            self.act = nn.ReLU()
            self.lm_head = nn.Linear(4, 10)

    lm = LM()
    units = _default_fsdp_units(lm, lm.lm_head)
    assert [type(u).__name__ for u in units] == ["Embedding", "Block", "Block"]
    assert all(u is not lm.lm_head for u in units)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    assert _default_fsdp_units(mlp, mlp[3]) == [mlp[1]]


def _cli_report(args: list[str], out: Path, nproc: int) -> dict:
    import json
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*(launcher if nproc > 1 else [sys.executable]), "-m", "unlearn_ext.cli", *args, "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_unlearn_run_under_torchrun_matches_one_process(tmp_path, strategy):
    """`torchrun --nproc_per_node=2 unlearn run ...` works unchanged: rank 0 writes the report, the
    fine-tuning ran data-parallel, and the metrics match the single-process run."""
    args = ["run", "--method", "finetune", "--forget-class", "3", "--dataset", "digits", "--no-cache", "--no-deep",
            "--no-progress", "--epochs", "1", "--strategy", strategy]  # fmt: skip
    two = _cli_report(args, tmp_path / "two", 2)
    one = _cli_report(args, tmp_path / "one", 1)
    assert two["world_size"] == 2 and two["strategy"] == strategy and one["world_size"] == 1
    a, b = two["methods"]["finetune"], one["methods"]["finetune"]
    assert "error" not in a, a
    for key in ("forget_acc", "retain_acc", "test_acc"):
        # Same global batches; only the last, uneven batch differs (DistributedSampler-style padding).
        assert a[key] == pytest.approx(b[key], abs=0.02), key
    assert two["methods"]["original"]["forget_acc"] == one["methods"]["original"]["forget_acc"]
