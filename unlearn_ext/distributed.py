"""Data parallelism with ``torch.distributed``: sharded data, bucketed reductions, the diagonal Fisher
and the fine-tuning methods under DDP or FSDP2 (``torch.distributed.fsdp.fully_shard``).

Nothing here is a communication engine of its own: gradients are averaged by
``DistributedDataParallel`` or by FSDP2's reduce-scatter; sums (the Fisher, MUSO's Gram matrix) are
``dist.all_reduce``-d in a few flat buckets. Launch with ``torchrun`` (or any launcher that sets up
the default process group; :func:`init_from_env` does it from torchrun's environment variables).

The data contract: every rank is given the *same global* sequence of ``(inputs, targets)`` batches
(same data, same shuffling seed) and :func:`shard_batches` gives each rank its part of every batch,
the way ``DistributedSampler`` splits a data set (rank ``r`` takes samples ``r, r + W, r + 2W, ...``).
Alternatively pass batches that are already per rank (a ``DataLoader`` over a ``DistributedSampler``)
with ``shard=False``.

Equivalence with one process: a training step on the shards of global batch ``k`` averages the
ranks' gradients of their mean losses, which is the gradient of the mean loss over the whole batch
when the shards have equal sizes (batch sizes divisible by the world size; ``uneven="pad"`` makes
them equal otherwise, by repeating samples as ``DistributedSampler`` does). The Fisher is a sum, so
it is sharded with no padding and is exact for any split.

SIU and its baselines (``siu``, ``ga``, ``ga_kl``, ``po``) fine-tune a multimodal LM rather than a
classifier on batches: they run data-parallel through :func:`unlearn_ext.siu.train.finetune_llm`
(and so :func:`unlearn_ext.siu.unlearn_concept`) with ``FinetuneConfig(distributed="ddp" | "fsdp")``,
which uses the helpers here (:func:`_decoder_layers` picks its FSDP2 units); its module docstring
says how a step is split and normalised so that it equals the single-process step.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from unlearn_ext.fisher import diagonal_fisher

if TYPE_CHECKING:
    from unlearn_ext.methods._base import Unlearner, UnlearnResult

try:
    import torch.distributed as dist
except ImportError:  # pragma: no cover - torch built without distributed support
    dist = None  # type: ignore[assignment]

__all__ = [
    "DDP_METHODS",
    "DEFAULT_BUCKET_BYTES",
    "DataParallel",
    "FSDP_METHODS",
    "ShardedBatches",
    "all_reduce_buckets",
    "broadcast_buckets",
    "current_data_parallel",
    "distributed_diagonal_fisher",
    "init_from_env",
    "is_distributed",
    "is_main_process",
    "rank",
    "shard_batches",
    "unlearn_distributed",
    "world_size",
]

#: Bucket size of :func:`all_reduce_buckets` (DDP's default ``bucket_cap_mb``).
DEFAULT_BUCKET_BYTES = 25 * 2**20
UNEVEN = ("pad", "drop", "allow")
SHARD_MODES = ("split", "whole")
STRATEGIES = ("ddp", "fsdp")

#: Methods that run under :func:`unlearn_distributed` with ``strategy="ddp"``.
DDP_METHODS = frozenset(
    {
        "finetune",
        "neggrad",
        "neggrad_plus",
        "opc",
        "scrub",
        "muso",
        "random_label",
        "salun",
        "bad_teacher",
        "retrain",
    }
)
#: Methods that run under ``strategy="fsdp"`` (FSDP2's ``fully_shard``).
FSDP_METHODS = frozenset(
    {"finetune", "neggrad", "neggrad_plus", "opc", "scrub", "muso", "random_label", "salun", "bad_teacher"}
)
#: SIU and its baselines: data-parallel through ``unlearn_ext.siu.train.finetune_llm`` (``FinetuneConfig.distributed``).
_CONCEPT_METHODS = frozenset({"siu", "ga", "ga_kl", "po"})
_WHY_NOT = {
    "mnemonic": "it is a one-shot edit from the mnemonic codes (no data, no training): run it on one rank",
    "ssd": "it is a one-shot edit from the forget/retain Fishers: compute them with distributed_diagonal_fisher",
    "fisher_forgetting": "it is a one-shot edit from the retain Fisher: compute it with distributed_diagonal_fisher",
}
_WHY_NOT_FSDP = {
    "retrain": "it re-initialises the parameters in place, which FSDP2 has replaced by shards (use strategy='ddp')",
}


def _require_dist() -> None:
    if dist is None or not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed support")


# --------------------------------------------------------------------------------------------
# Process group
# --------------------------------------------------------------------------------------------


def is_distributed(group: Any = None) -> bool:
    """True when a ``torch.distributed`` process group is initialised with more than one process."""
    return dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank(group: Any = None) -> int:
    """This process's rank in ``group`` (the default group when None); 0 without a process group."""
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


def world_size(group: Any = None) -> int:
    """Number of processes in ``group`` (the default group when None); 1 without a process group."""
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


_group_rank, _group_size = rank, world_size  # for functions whose arguments shadow the names


def is_main_process(group: Any = None) -> bool:
    """Rank 0 (or no process group): the process that writes reports and checkpoints."""
    return rank(group) == 0


def init_from_env(backend: str | None = None) -> bool:
    """Initialise the default process group from torchrun's variables when ``WORLD_SIZE > 1``.

    Picks ``"nccl"`` when CUDA is available and ``"gloo"`` otherwise (``backend`` overrides), and on
    CUDA selects the device ``LOCAL_RANK``. Returns True when the run is distributed (also when the
    group was already initialised). A no-op returning False for a single process.
    """
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    _require_dist()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return dist.get_world_size() > 1


def _require_group(what: str, group: Any) -> None:
    _require_dist()
    if not dist.is_initialized():
        raise RuntimeError(
            f"{what} needs an initialised torch.distributed process group: launch with torchrun and call "
            "unlearn_ext.distributed.init_from_env() (or torch.distributed.init_process_group) first"
        )


# --------------------------------------------------------------------------------------------
# Sharded batches
# --------------------------------------------------------------------------------------------


def _batch_len(batch: Any, i: int) -> int:
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise ValueError(f"batch {i}: batches must be (inputs, targets) or (inputs, targets, group_ids) tuples")
    y = batch[1]
    if isinstance(y, torch.Tensor) and y.dim() >= 1:
        return int(y.shape[0])
    x = batch[0]
    if isinstance(x, torch.Tensor) and x.dim() >= 1:
        return int(x.shape[0])
    raise ValueError(f"batch {i}: cannot tell its number of samples (no tensor targets or inputs with a batch dim)")


def _take(obj: Any, sel: slice | torch.Tensor, n: int) -> Any:
    """Samples ``sel`` of every tensor with leading dimension ``n`` in a (nested) batch."""
    if isinstance(obj, torch.Tensor):
        if obj.dim() >= 1 and obj.shape[0] == n:
            return obj[sel] if isinstance(sel, slice) else obj.index_select(0, sel.to(obj.device))
        return obj
    if isinstance(obj, Mapping):  # e.g. Hugging Face inputs: a plain dict, called as model(**inputs)
        return {k: _take(v, sel, n) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_take(v, sel, n) for v in obj)
    return obj


def _shard_selection(n: int, r: int, w: int, uneven: str) -> slice | torch.Tensor:
    """Rank ``r``'s samples of a batch of ``n`` (DistributedSampler's rule, applied per batch)."""
    if uneven == "pad" and n % w:
        total = -(-n // w) * w
        idx = torch.arange(n)
        idx = torch.cat([idx, idx.repeat(-(-(total - n) // n))[: total - n]])  # wrap around, as DistributedSampler
        return idx[r::w]
    if uneven == "drop":
        return slice(r, n - n % w, w)
    return slice(r, n, w)


class ShardedBatches:
    """This rank's part of re-iterable global ``(inputs, targets[, group_ids])`` batches.

    Every rank must be given the same global batches (same data, same shuffling seed). Iterating this
    iterates ``batches`` exactly once.

    Args:
        batches: the global batches (re-iterable: a ``DataLoader``, :class:`~unlearn_ext.data.TensorBatches`, a list).
        rank, world_size: this rank and the number of ranks.
        mode: ``"split"``: every batch is split across the ranks, sample ``i`` of a batch going to rank
            ``i % world_size`` (DistributedSampler's order), so step ``k`` on all ranks together sees
            global batch ``k``. ``"whole"``: batch ``k`` goes whole to rank ``k % world_size``.
        uneven: what ``"split"`` does with a batch of ``n`` samples when ``world_size`` does not divide ``n``:
            ``"pad"`` (DistributedSampler's ``drop_last=False``): samples from the start of the batch are
            repeated so every rank gets ``ceil(n / W)``: equal shards, so DDP steps stay in lockstep and
            average equal-sized means, but the repeated samples count twice in that step.
            ``"drop"`` (``drop_last=True``): the last ``n % W`` samples are left out (batches that become
            empty are skipped, on every rank alike). ``"allow"``: no padding or dropping, rank ``r``
            gets ``n // W`` or ``n // W + 1`` samples and empty shards are skipped: for sums such as the
            Fisher, where a duplicated sample would change the result; never for DDP training.
    """

    def __init__(
        self, batches: Iterable[Any], *, rank: int, world_size: int, mode: str = "split", uneven: str = "pad"
    ) -> None:
        if mode not in SHARD_MODES:
            raise ValueError(f"mode must be one of {SHARD_MODES}, got {mode!r}")
        if uneven not in UNEVEN:
            raise ValueError(f"uneven must be one of {UNEVEN}, got {uneven!r}")
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
        try:
            it = iter(batches)
        except TypeError as e:
            raise TypeError(f"batches must be an iterable of batches, got {type(batches).__name__}") from e
        if it is batches:  # a one-shot iterator: keep its batches so every epoch sees them
            batches = list(it)
        self.batches = batches
        self.rank, self.world_size, self.mode, self.uneven = rank, world_size, mode, uneven

    def __iter__(self) -> Iterator[Any]:
        r, w = self.rank, self.world_size
        for i, batch in enumerate(self.batches):
            if self.mode == "whole":
                if i % w == r:
                    yield batch
                continue
            n = _batch_len(batch, i)
            sel = _shard_selection(n, r, w, self.uneven)
            if self.uneven != "pad" and len(range(n)[sel]) == 0:
                continue  # an empty shard: nothing to add to a sum (never with "pad": DDP needs lockstep)
            yield type(batch)(_take(part, sel, n) for part in batch)

    def __len__(self) -> int:
        """The number of local batches, when ``batches`` has a length and it is known without iterating
        (``mode="whole"``, or ``uneven="pad"``: one local batch per global batch)."""
        n = len(self.batches)  # TypeError when the global batches have no length
        if self.mode == "whole":
            return len(range(self.rank, n, self.world_size))
        if self.uneven == "pad":
            return n
        raise TypeError(f"the number of local batches with uneven={self.uneven!r} is only known by iterating")

    def __repr__(self) -> str:
        return (
            f"ShardedBatches(rank={self.rank}, world_size={self.world_size}, mode={self.mode!r}, "
            f"uneven={self.uneven!r}, batches={type(self.batches).__name__})"
        )


def shard_batches(
    batches: Iterable[Any],
    *,
    rank: int | None = None,
    world_size: int | None = None,
    group: Any = None,
    mode: str = "split",
    uneven: str = "pad",
) -> ShardedBatches:
    """This rank's :class:`ShardedBatches` of the global ``batches`` (rank and world size default to
    ``group``'s, or 0 and 1 without a process group). See :class:`ShardedBatches` for ``mode`` and
    ``uneven``; ``uneven="pad"`` (the default) suits DDP/FSDP training, ``"allow"`` sums."""
    r = _group_rank(group) if rank is None else rank
    w = _group_size(group) if world_size is None else world_size
    return ShardedBatches(batches, rank=r, world_size=w, mode=mode, uneven=uneven)


# --------------------------------------------------------------------------------------------
# Bucketed collectives
# --------------------------------------------------------------------------------------------


def _plan_buckets(tensors: Sequence[torch.Tensor], bucket_bytes: int) -> list[list[int]]:
    """Indices of ``tensors`` grouped by (dtype, device) in first-seen order, then cut greedily into
    buckets of at most ``bucket_bytes`` (a tensor larger than that is a bucket of its own)."""
    by_kind: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{i}] is a {type(t).__name__}, not a tensor")
        if t.layout != torch.strided:
            raise ValueError(f"tensors[{i}] has layout {t.layout}; only dense tensors can be bucketed")
        by_kind.setdefault((t.dtype, t.device), []).append(i)
    buckets: list[list[int]] = []
    for idxs in by_kind.values():
        current: list[int] = []
        size = 0
        for i in idxs:
            nbytes = tensors[i].numel() * tensors[i].element_size()
            if current and size + nbytes > bucket_bytes:
                buckets.append(current)
                current, size = [], 0
            current.append(i)
            size += nbytes
        if current:
            buckets.append(current)
    return buckets


def _bucketed(tensors: Sequence[torch.Tensor], bucket_bytes: int, collective: Callable[[torch.Tensor], None]) -> None:
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be a positive int, got {bucket_bytes!r}")
    for bucket in _plan_buckets(tensors, bucket_bytes):
        ts = [tensors[i] for i in bucket]
        if len(ts) == 1 and ts[0].is_contiguous():
            collective(ts[0])  # in place, no copy
            continue
        flat = _flatten_dense_tensors(ts)
        collective(flat)
        for t, part in zip(ts, _unflatten_dense_tensors(flat, ts), strict=True):
            t.copy_(part)


def all_reduce_buckets(
    tensors: Sequence[torch.Tensor],
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    op: Any = None,
    group: Any = None,
) -> list[torch.Tensor]:
    """``dist.all_reduce`` of ``tensors`` in place, one collective per bucket, not per tensor.

    Tensors of one dtype and device are flattened together (``torch._utils._flatten_dense_tensors``)
    into buckets of at most ``bucket_bytes`` (DDP's 25 MiB by default), each bucket is reduced with a
    single ``dist.all_reduce`` (``op``, default ``SUM``), and the results are copied back into the
    tensors. Every rank must pass tensors of the same shapes, dtypes and order. Returns ``tensors``.
    """
    _require_group("all_reduce_buckets", group)
    op = dist.ReduceOp.SUM if op is None else op
    tensors = list(tensors)
    _bucketed(tensors, bucket_bytes, lambda t: dist.all_reduce(t, op=op, group=group))
    return tensors


def broadcast_buckets(
    tensors: Sequence[torch.Tensor], *, src: int = 0, bucket_bytes: int = DEFAULT_BUCKET_BYTES, group: Any = None
) -> list[torch.Tensor]:
    """``dist.broadcast`` of ``tensors`` from group rank ``src``, in place, one collective per bucket."""
    _require_group("broadcast_buckets", group)
    global_src = dist.get_global_rank(group, src) if group is not None else src
    tensors = list(tensors)
    _bucketed(tensors, bucket_bytes, lambda t: dist.broadcast(t, src=global_src, group=group))
    return tensors


# --------------------------------------------------------------------------------------------
# Diagonal Fisher
# --------------------------------------------------------------------------------------------


def distributed_diagonal_fisher(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    shard: bool = True,
    group: Any = None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    **kwargs: Any,
) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], torch.Tensor]:
    """:func:`unlearn_ext.fisher.diagonal_fisher` under data parallelism: the same result on every rank.

    Each rank accumulates the Fisher sums of its shard (``shard=True``: ``batches`` are the global
    batches, identical on every rank, split with no padding or duplication, so the sum is the
    single-process sum for any number of samples; with ``granularity="batch"`` whole batches are dealt
    round-robin instead, since a batch's summed gradient cannot be split. ``shard=False``: ``batches``
    are already this rank's). Then the counts (with an error flag per rank) are reduced in one
    ``all_reduce``, and the sums in buckets (:func:`all_reduce_buckets`): ``1 + number of buckets``
    collectives in all. A rank whose local pass fails makes every rank raise (no rank is left waiting).

    Every keyword of ``diagonal_fisher`` is accepted (``loss_fn``, ``groups``, ``num_groups``,
    ``granularity``, ``labels``, ``seed``, ``params``, ``backend``, ``return_counts``, ...). With
    ``labels="sampled"`` each rank draws its Monte-Carlo targets with seed ``seed + rank``: a valid
    sampled Fisher, but not the same draws as one process.

    ``model`` is the plain module, the same on every rank (a ``DistributedDataParallel`` wrapper is
    unwrapped); an FSDP2-sharded model raises NotImplementedError (gather its weights first).
    """
    from unlearn_ext.methods._base import unwrap_model

    _require_group("distributed_diagonal_fisher", group)
    if isinstance(model, nn.Module):
        model = unwrap_model(model)
        if any(callable(getattr(p, "full_tensor", None)) for p in model.parameters()):
            raise NotImplementedError(
                "distributed_diagonal_fisher needs the full parameters on every rank, but this model's are sharded "
                "DTensors (FSDP2): compute the Fisher of an unsharded copy (e.g. the .model of "
                "unlearn_distributed(..., strategy='fsdp'), which gathers them)"
            )
    return_counts = bool(kwargs.pop("return_counts", False))
    kwargs.pop("_allow_empty", None)
    r, w = rank(group), world_size(group)
    if shard:
        mode = "whole" if kwargs.get("granularity", "sample") == "batch" else "split"
        local: Iterable[Any] = ShardedBatches(batches, rank=r, world_size=w, mode=mode, uneven="allow")
    else:
        local = batches
    if kwargs.get("labels") == "sampled":
        kwargs["seed"] = int(kwargs.get("seed", 0)) + r
    num_groups = kwargs.get("num_groups", 1)
    k = num_groups if isinstance(num_groups, int) and not isinstance(num_groups, bool) and num_groups > 0 else 1
    first = next(model.parameters(), None) if isinstance(model, nn.Module) else None
    device = first.device if first is not None else torch.device("cpu")

    error: BaseException | None = None
    sums: dict[str, torch.Tensor] = {}
    counts = torch.zeros(k, dtype=torch.long)
    try:
        sums, counts = diagonal_fisher(model, local, return_counts=True, _allow_empty=True, **kwargs)
    except Exception as e:  # reported to every rank below, then re-raised here
        error = e
    # One int64 bucket: the counts, then one failure flag per rank.
    status = torch.zeros(k + w, dtype=torch.long, device=device)
    status[:k] = counts.to(device)
    status[k + r] = int(error is not None)
    all_reduce_buckets([status], group=group)
    failed = status[k:].nonzero().flatten().tolist()
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"distributed_diagonal_fisher failed on rank(s) {failed}; see their error")
    counts = status[:k].cpu()
    if int(counts.sum()) == 0:
        raise ValueError("batches yielded no samples on any rank: the Fisher of an empty set is undefined")
    all_reduce_buckets(list(sums.values()), bucket_bytes=bucket_bytes, group=group)
    return (sums, counts) if return_counts else sums


# --------------------------------------------------------------------------------------------
# Fine-tuning methods under DDP / FSDP2
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataParallel:
    """What a method sees through :func:`current_data_parallel` while :func:`unlearn_distributed` runs it."""

    strategy: str
    group: Any
    rank: int
    world_size: int

    def all_reduce(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Sum ``tensors`` over the ranks, in place (bucketed)."""
        return all_reduce_buckets(tensors, group=self.group)


_ACTIVE: contextvars.ContextVar[DataParallel | None] = contextvars.ContextVar("unlearn_ext_data_parallel", default=None)


def current_data_parallel() -> DataParallel | None:
    """The data-parallel context of the method being run by :func:`unlearn_distributed`, else None.

    Methods that accumulate statistics over a whole data set (MUSO's retain Gram matrix, SalUn's
    saliency) sum them over the ranks through it; everything else needs no change.
    """
    return _ACTIVE.get()


@contextlib.contextmanager
def _active(ctx: DataParallel):
    token = _ACTIVE.set(ctx)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def _contains(module: nn.Module, target: nn.Module) -> bool:
    return any(m is target for m in module.modules())


def _default_fsdp_units(model: nn.Module, head: nn.Module | None) -> list[nn.Module]:
    """Modules to ``fully_shard`` before the root, innermost first: every element of an
    ``nn.ModuleList`` (transformer blocks) and every parameterised child, descending into the
    modules that contain the head, which itself stays in the root group."""
    units: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        for child in m.children():
            if head is not None and _contains(child, head):
                if child is not head:
                    visit(child)
                continue
            if next(child.parameters(), None) is None:
                continue
            for inner in child.modules():
                if isinstance(inner, nn.ModuleList):
                    units.extend(b for b in inner if next(b.parameters(), None) is not None)
            if not isinstance(child, (nn.ModuleList, nn.ModuleDict)):  # containers have no forward to hook
                units.append(child)

    visit(model)
    seen: set[int] = set()
    out = []
    for u in units:
        if id(u) not in seen:
            seen.add(id(u))
            out.append(u)
    return out


def _final_linear_or_none(model: nn.Module) -> nn.Linear | None:
    from unlearn_ext.models.heads import final_linear

    try:
        return final_linear(model)
    except ValueError:
        return None


def _gathered_copy(sharded: nn.Module, template: nn.Module, device: torch.device) -> nn.Module:
    """A plain module with the full current weights of the FSDP2 module ``sharded`` (a collective)."""
    full = {}
    for name, value in sharded.state_dict().items():
        gather = getattr(value, "full_tensor", None)
        full[name] = (gather() if callable(gather) else value).detach()
    plain = copy.deepcopy(template).to_empty(device=device)
    plain.load_state_dict(full)
    with torch.no_grad():  # FSDP2 does not shard buffers: take non-persistent ones as they are
        for name, buf in sharded.named_buffers():
            plain.get_buffer(name).copy_(buf)
    # Moving to the meta device unties shared parameters (an LM head tied to the token embedding):
    # tie them again as the sharded module has them (FSDP2 shards a shared parameter once).
    first: dict[int, str] = {}
    for name, p in sharded.named_parameters(remove_duplicate=False):
        if id(p) not in first:
            first[id(p)] = name
            continue
        owner, _, leaf = name.rpartition(".")
        setattr(plain.get_submodule(owner), leaf, plain.get_parameter(first[id(p)]))
    return plain.train(sharded.training)


def _wrap_ddp(work: nn.Module, group: Any, options: Mapping[str, Any]) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    from unlearn_ext.methods._base import model_device

    device = model_device(work)
    kwargs = dict(options)
    if device.type == "cuda":
        kwargs.setdefault("device_ids", [device.index if device.index is not None else torch.cuda.current_device()])
    return DistributedDataParallel(work, process_group=group, **kwargs)


def _fsdp_mesh(group: Any, device: torch.device):
    """The 1-D device mesh of ``group`` (the default group when None) on ``device``'s type, for ``fully_shard``."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    if group is not None:
        return DeviceMesh.from_group(group, device.type)
    return init_device_mesh(device.type, (world_size(),))


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model``'s language model(s), in order: the elements of every
    ``nn.ModuleList`` that is a direct child of a module that also directly owns an ``nn.Embedding``
    (``LlamaModel.layers`` next to ``embed_tokens``, and the same inside LLaVA or MiniLlava).

    These are the FSDP2 units of :func:`unlearn_ext.siu.train.finetune_llm`: every rank runs every
    one of them in every step. A vision tower's blocks are deliberately not picked (CLIP's encoder
    layers sit next to no embedding table): a rank whose shard of a batch has no image does not
    run the vision tower at all, and an FSDP unit that only some ranks run would leave the others
    waiting in its all-gather; in the root unit the tower is gathered on every rank instead.
    """
    out: list[nn.Module] = []
    seen: set[int] = set()
    for m in model.modules():
        children = list(m.children())
        if not any(isinstance(c, nn.Embedding) for c in children):
            continue
        for c in children:
            if isinstance(c, nn.ModuleList):
                for block in c:
                    if id(block) not in seen and next(block.parameters(), None) is not None:
                        seen.add(id(block))
                        out.append(block)
    return out


def _wrap_fsdp(
    work: nn.Module, group: Any, units: Sequence[nn.Module] | None, options: Mapping[str, Any]
) -> tuple[nn.Module, nn.Module]:
    from torch.distributed.fsdp import fully_shard

    from unlearn_ext.methods._base import model_device

    device = model_device(work)
    template = copy.deepcopy(work).to(device="meta")
    # FSDP2 does not synchronise the initial weights (DDP does): start every rank from rank 0's.
    with torch.no_grad():
        broadcast_buckets([*work.parameters(), *work.buffers()], group=group)
    mesh = _fsdp_mesh(group, device)
    head = _final_linear_or_none(work)
    chosen = list(_default_fsdp_units(work, head) if units is None else units)
    for u in chosen:
        if u is work:
            raise ValueError("fsdp_units must not include the model itself (it is always the root unit)")
        if not _contains(work, u):
            raise ValueError(f"fsdp_units: a {type(u).__name__} that is not a submodule of the model")
        if head is not None and _contains(u, head):
            raise ValueError(
                "fsdp_units must leave the final nn.Linear (the head) in the root FSDP group: the fused losses "
                "(OPC's CE + norm) read the head's weight after the forward, which only the root group keeps "
                "gathered until the backward"
            )
    # Innermost first, as fully_shard requires.
    depth = {id(m): name.count(".") + 1 for name, m in work.named_modules() if name}
    for u in sorted(chosen, key=lambda m: -depth.get(id(m), 0)):
        fully_shard(u, mesh=mesh, **options)
    fully_shard(work, mesh=mesh, **options)
    # The root keeps its parameters gathered after a forward (until the backward). A forward without
    # gradients has no backward: reshard at once, so that parameters() (e.g. an optimiser built
    # after check_batches' no-grad forward) are the sharded ones again.
    work.register_forward_hook(lambda m, _args, _out: None if torch.is_grad_enabled() else m.reshard())
    return work, template


def _check_lockstep(forget: Any, retain: Any, group: Any, device: torch.device) -> None:
    """With per-rank batches (shard=False): the same number of batches on every rank, when known."""
    lengths = []
    for b in (forget, retain):
        try:
            lengths.append(len(b) if b is not None else 0)
        except TypeError:
            return
    t = torch.tensor(lengths + [-n for n in lengths], dtype=torch.long, device=device)  # NCCL: on the GPU
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    hi, lo = t[:2].tolist(), [-v for v in t[2:].tolist()]
    if hi != lo:
        raise ValueError(
            f"the ranks have different numbers of forget/retain batches (min {lo}, max {hi}): DDP/FSDP steps "
            "must be in lockstep; shard global batches with shard=True or use DistributedSampler(drop_last=...)"
        )


def unlearn_distributed(
    model: nn.Module,
    method: str | Unlearner,
    *,
    forget: Iterable[Any],
    retain: Iterable[Any] | None = None,
    strategy: str = "ddp",
    shard: bool = True,
    uneven: str = "pad",
    group: Any = None,
    fsdp_units: Sequence[nn.Module] | None = None,
    ddp_options: Mapping[str, Any] | None = None,
    fsdp_options: Mapping[str, Any] | None = None,
    gather: bool = True,
    **hparams: Any,
) -> UnlearnResult:
    """:func:`unlearn_ext.unlearn` with the method's training data-parallel over the process group.

    ``method`` is a method name (with its ``hparams``) or an :class:`~unlearn_ext.methods.Unlearner`
    instance (then no ``hparams``; its ``log`` is filled as by ``.unlearn``).

    Every rank calls it with the same model (DDP broadcasts rank 0's weights; so does this for FSDP2)
    and the same global ``forget`` / ``retain`` batches (``shard=True``: split per batch by
    :func:`shard_batches` with ``uneven``), or with its own batches (``shard=False``, e.g. a
    ``DataLoader`` over a ``DistributedSampler``; every rank must then have the same number of batches).

    ``strategy="ddp"``: the method trains ``DistributedDataParallel(model)``. ``strategy="fsdp"``: FSDP2,
    ``fully_shard`` applied to ``fsdp_units`` (default: every ``nn.ModuleList`` element and every
    parameterised submodule not containing the final ``nn.Linear``) and then to the root, which holds
    the head so that fused losses on the head's weight see it gathered. ``ddp_options`` /
    ``fsdp_options`` go to ``DistributedDataParallel`` / ``fully_shard`` (e.g. ``mp_policy``).

    The methods run unchanged: forward passes go through the wrapper, teachers and reference copies are
    plain full copies on every rank (:func:`unlearn_ext.methods._base.model_copy`), and data-set
    statistics are summed over the ranks (:func:`current_data_parallel`). BatchNorm normalises each
    rank's shard (pass ``ddp_options`` and convert with ``nn.SyncBatchNorm`` where that matters).
    ``log`` and ``seconds`` are this rank's.

    Returns:
        an :class:`~unlearn_ext.methods.UnlearnResult` whose ``.model`` is a plain module with the
        unlearned weights on every rank (for FSDP2 gathered from the shards; ``gather=False`` returns
        the sharded FSDP2 module instead). The input model is unchanged unless ``inplace=True``.

    Raises:
        RuntimeError: no process group. ValueError: bad arguments. NotImplementedError: a method that
            does not run under ``strategy`` (:data:`DDP_METHODS`, :data:`FSDP_METHODS` list those that do).
    """
    from unlearn_ext.methods._base import _COPIERS, Unlearner, UnlearnResult, _reiterable, get_method, model_device

    _require_group("unlearn_distributed", group)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if uneven not in UNEVEN:
        raise ValueError(f"uneven must be one of {UNEVEN}, got {uneven!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(method, str) and method in _CONCEPT_METHODS:
        raise ValueError(
            f"{method!r} forgets a visual concept from a multimodal LM, not a classifier's data: run it "
            "data-parallel with unlearn_ext.siu.unlearn_concept(..., config=FinetuneConfig(distributed='ddp')) "
            "(or 'fsdp'; or unlearn_ext.siu.train.finetune_llm), called on every rank"
        )
    if isinstance(method, Unlearner):
        if hparams:
            raise ValueError(f"hyperparameters {sorted(hparams)} given with an Unlearner instance: set them on it")
        m, method = method, method.name
    elif isinstance(method, str):
        m = get_method(method, **hparams)
    else:
        raise TypeError(f"method must be a method name or an Unlearner, got {type(method).__name__}")
    supported = DDP_METHODS if strategy == "ddp" else FSDP_METHODS
    if method not in supported:
        why = _WHY_NOT.get(method) or (_WHY_NOT_FSDP.get(method) if strategy == "fsdp" else None)
        raise NotImplementedError(
            f"method {method!r} does not run under strategy={strategy!r}"
            + (f": {why}" if why else "")
            + f"; supported: {', '.join(sorted(supported))}"
        )
    r, w = rank(group), world_size(group)
    forget = _reiterable(forget, "forget")
    retain = _reiterable(retain, "retain")
    if shard:
        forget = ShardedBatches(forget, rank=r, world_size=w, uneven=uneven) if forget is not None else None
        retain = ShardedBatches(retain, rank=r, world_size=w, uneven=uneven) if retain is not None else None
    else:
        _check_lockstep(forget, retain, group, model_device(model))

    inplace = m.inplace
    t0 = time.perf_counter()
    work = model if (inplace and strategy == "ddp") else copy.deepcopy(model)
    device = model_device(work)
    ctx = DataParallel(strategy, group, r, w)
    template = None
    if strategy == "ddp":
        wrapped = _wrap_ddp(work, group, ddp_options or {})
    else:
        wrapped, template = _wrap_fsdp(work, group, fsdp_units, fsdp_options or {})
        _COPIERS[wrapped] = lambda: _gathered_copy(wrapped, template, device)
    m.inplace = True  # on the wrapper, which trains `work`
    try:
        with _active(ctx):
            m.unlearn(wrapped, forget, retain)
    finally:
        m.inplace = inplace
        _COPIERS.pop(wrapped, None)
    if strategy == "ddp":
        out = work.eval()
    elif not gather:
        out = wrapped.eval()
    else:
        out = _gathered_copy(wrapped, template, device).eval()
        if inplace:
            model.load_state_dict(out.state_dict())
            out = model.eval()
    return UnlearnResult(out, time.perf_counter() - t0, m.log, method, m.hparams())
