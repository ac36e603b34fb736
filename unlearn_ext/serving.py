"""Low-downtime weight swaps for a model that is being served.

An inference thread calls the model under a shared *read* lock; :func:`swap_weights` validates and
copies the new weights while inference keeps running, then takes the exclusive *write* lock only to
repoint each parameter and buffer at its new storage (``tensor.data = staged``): O(number of
tensors), independent of their size. A reader therefore sees either the old model or the new one,
never a mixture, and waits at most for the pointer swap (plus the in-flight forwards the writer
waits for).

    served = ServedModel(model.eval())          # or: with model_lock(model).reading(): model(x)
    logits = served(x)                          # any thread, concurrently
    stats = swap_weights(model, new_state)      # any thread; stats.pause_s is the write-lock hold

Only code that reads the model under its lock (:class:`ServedModel`, or ``model_lock(model).reading()``)
is protected; a forward that bypasses the lock can observe a partly swapped model.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["RWLock", "ServedModel", "SwapStats", "model_lock", "swap_weights"]


# --------------------------------------------------------------------------------------------
# Readers-writer lock
# --------------------------------------------------------------------------------------------


class RWLock:
    """A readers-writer lock with writer preference, built on one :class:`threading.Condition`.

    Any number of threads may hold the read lock at once; the write lock excludes readers and other
    writers. Once a writer is waiting, new readers queue behind it, so a stream of overlapping
    inference calls cannot starve a swap: a writer waits only for the readers already inside. When a
    writer releases the lock, the readers that were queued by then go in before the next writer, so
    back-to-back swaps cannot starve inference either (phase-fair hand-off).

    Read acquisition is re-entrant per thread (a nested read never waits, so it cannot deadlock
    behind a waiting writer). Upgrading (writing while this thread reads), reading inside one's own
    write, and nested writes raise :class:`RuntimeError` instead of deadlocking.

    Use the context managers ``with lock.reading(): ...`` and ``with lock.writing(): ...``; their
    ``timeout`` (seconds, ``None`` waits forever) raises :class:`TimeoutError` when it expires.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0  # threads holding the read lock
        self._writer: int | None = None  # thread ident of the writer holding the lock
        self._writers_waiting = 0
        self._readers_waiting = 0
        self._admitted = 0  # queued readers let in ahead of waiting writers by the last write release
        self._local = threading.local()  # .depth: this thread's read nesting depth

    # -- state, for monitoring and tests ---------------------------------------------------------
    @property
    def readers(self) -> int:
        """Number of threads holding the read lock now."""
        return self._readers

    @property
    def writer_active(self) -> bool:
        """Whether a writer holds the lock now."""
        return self._writer is not None

    @property
    def writers_waiting(self) -> int:
        """Number of writers waiting for the lock now."""
        return self._writers_waiting

    @property
    def readers_waiting(self) -> int:
        """Number of readers waiting for the lock now."""
        return self._readers_waiting

    def _depth(self) -> int:
        return getattr(self._local, "depth", 0)

    # -- read side --------------------------------------------------------------------------------
    def acquire_read(self, timeout: float | None = None) -> bool:
        """Take the read lock; returns False when ``timeout`` (seconds) expires first."""
        me = threading.get_ident()
        depth = self._depth()
        if depth:
            self._local.depth = depth + 1
            return True
        with self._cond:
            if self._writer == me:
                raise RuntimeError("RWLock: this thread holds the write lock; it cannot also take the read lock")
            if self._writer is not None or self._writers_waiting:
                self._readers_waiting += 1
                try:
                    ok = self._cond.wait_for(
                        lambda: self._writer is None and (self._writers_waiting == 0 or self._admitted > 0), timeout
                    )
                finally:
                    self._readers_waiting -= 1
                if not ok:
                    self._admitted = min(self._admitted, self._readers_waiting)
                    self._cond.notify_all()  # a writer may be waiting for this reader's admission
                    return False
                if self._admitted:
                    self._admitted -= 1
            self._readers += 1
        self._local.depth = 1
        return True

    def release_read(self) -> None:
        """Release one level of this thread's read lock."""
        depth = self._depth()
        if depth <= 0:
            raise RuntimeError("RWLock: release_read without a matching acquire_read in this thread")
        self._local.depth = depth - 1
        if depth > 1:
            return
        with self._cond:
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    # -- write side -------------------------------------------------------------------------------
    def acquire_write(self, timeout: float | None = None) -> bool:
        """Take the exclusive write lock; returns False when ``timeout`` (seconds) expires first."""
        me = threading.get_ident()
        if self._depth():
            raise RuntimeError("RWLock: this thread holds the read lock; release it before writing (no upgrade)")
        with self._cond:
            if self._writer == me:
                raise RuntimeError("RWLock: this thread already holds the write lock (it is not re-entrant)")
            self._writers_waiting += 1
            try:
                ok = self._cond.wait_for(
                    lambda: self._writer is None and self._readers == 0 and self._admitted == 0, timeout
                )
            finally:
                self._writers_waiting -= 1
            if not ok:
                self._cond.notify_all()  # readers queued behind this writer may go now
                return False
            self._writer = me
        return True

    def release_write(self) -> None:
        """Release the write lock (only the thread holding it may); queued readers go in next."""
        with self._cond:
            if self._writer != threading.get_ident():
                raise RuntimeError("RWLock: release_write by a thread that does not hold the write lock")
            self._writer = None
            self._admitted = self._readers_waiting
            self._cond.notify_all()

    # -- context managers -------------------------------------------------------------------------
    @contextlib.contextmanager
    def reading(self, timeout: float | None = None) -> Iterator[None]:
        """``with lock.reading(): ...`` holds the shared read lock for the block."""
        if not self.acquire_read(timeout):
            raise TimeoutError(f"RWLock: read lock not acquired within {timeout} s")
        try:
            yield
        finally:
            self.release_read()

    @contextlib.contextmanager
    def writing(self, timeout: float | None = None) -> Iterator[None]:
        """``with lock.writing(): ...`` holds the exclusive write lock for the block."""
        if not self.acquire_write(timeout):
            raise TimeoutError(f"RWLock: write lock not acquired within {timeout} s")
        try:
            yield
        finally:
            self.release_write()

    def __repr__(self) -> str:
        return (
            f"RWLock(readers={self._readers}, writer_active={self.writer_active}, "
            f"writers_waiting={self._writers_waiting}, readers_waiting={self._readers_waiting})"
        )


# --------------------------------------------------------------------------------------------
# The lock of a live model
# --------------------------------------------------------------------------------------------

# Keyed by id() with a weakref.finalize per model, not stored on the module: the module's
# __dict__, state_dict, pickling and copy.deepcopy stay untouched (a lock cannot be pickled), and
# modules that are unhashable still work.
_LOCKS: dict[int, RWLock] = {}
_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> RWLock:
    """The :class:`RWLock` of ``model``, created on first use and the same object afterwards.

    :class:`ServedModel` and :func:`swap_weights` use it by default, so inference wrapped by one and
    swaps done by the other exclude each other without passing a lock around. The lock lives as
    long as the model (it is not an attribute of the module).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_lock expects an nn.Module, got {type(model).__name__}")
    key = id(model)
    with _LOCKS_GUARD:
        lock = _LOCKS.get(key)
        if lock is None:
            lock = _LOCKS[key] = RWLock()
            weakref.finalize(model, _LOCKS.pop, key, None)
        return lock


class ServedModel:
    """A model being served: calls run under ``torch.no_grad()`` and the model's read lock.

    ``served(*args, **kwargs)`` (or ``served.infer(...)``) returns ``model(*args, **kwargs)``;
    concurrent calls run in parallel, and a concurrent :meth:`swap` (or :func:`swap_weights` on the
    same model) is never observed half-done. Put the model in eval mode first: a train-mode forward
    (BatchNorm statistics updates) mutates buffers, which is a data race between concurrent readers.
    Outputs that alias a parameter keep the old values after a swap (storage is replaced, not
    overwritten).
    """

    def __init__(self, model: nn.Module, *, lock: RWLock | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"ServedModel expects an nn.Module, got {type(model).__name__}")
        self.model = model
        self.lock = lock if lock is not None else model_lock(model)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.lock.reading(), torch.no_grad():
            return self.model(*args, **kwargs)

    infer = __call__

    def reading(self, timeout: float | None = None) -> contextlib.AbstractContextManager[None]:
        """The read lock, for inference code that needs more than one call to see one model."""
        return self.lock.reading(timeout)

    def swap(self, new_state: Mapping[str, torch.Tensor] | nn.Module, **kwargs: Any) -> SwapStats:
        """:func:`swap_weights` on this model with this lock (same keyword arguments)."""
        return swap_weights(self.model, new_state, lock=self.lock, **kwargs)

    def __repr__(self) -> str:
        return f"ServedModel({type(self.model).__name__}, {self.lock!r})"


# --------------------------------------------------------------------------------------------
# swap_weights
# --------------------------------------------------------------------------------------------


@dataclass
class SwapStats:
    """What one :func:`swap_weights` call did and how long each phase took (seconds, wall clock).

    ``pause_s`` is the time the write lock was held (readers arriving meanwhile wait for it);
    ``wait_s`` the time spent waiting for in-flight readers before getting it (new readers queue
    during it too, writer preference); ``validate_s`` and ``staging_s`` ran before, and
    ``release_s`` (freeing the old storage) after, the lock, while inference continued.
    """

    pause_s: float
    wait_s: float
    validate_s: float
    staging_s: float
    release_s: float
    total_s: float
    tensors: int  # distinct tensors repointed (tied parameters count once)
    keys: int  # state_dict keys applied (tied parameters count once per key)
    bytes: int  # bytes of new storage staged and swapped in
    missing_keys: list[str] = field(default_factory=list)  # strict=False: live keys left unchanged
    unexpected_keys: list[str] = field(default_factory=list)  # strict=False: new_state keys ignored


def _state_entries(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``{state_dict key: live tensor}`` (the Parameter or buffer objects, aliases included), as
    ``nn.Module.state_dict`` names them without hooks, and the keys of modules' extra state."""
    entries: dict[str, torch.Tensor] = {}
    extra: list[str] = []
    for prefix, mod in model.named_modules(remove_duplicate=False):
        pre = f"{prefix}." if prefix else ""
        for name, p in mod._parameters.items():
            if p is not None:
                entries[pre + name] = p
        for name, b in mod._buffers.items():
            if b is not None and name not in mod._non_persistent_buffers_set:
                entries[pre + name] = b
        if type(mod).get_extra_state is not nn.Module.get_extra_state:
            extra.append(pre + "_extra_state")
    return entries, extra


def _keys_text(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    if a.shape != b.shape:
        return False
    if (
        a.device == b.device
        and a.dtype == b.dtype
        and a.data_ptr() == b.data_ptr()
        and a.stride() == b.stride()
        and not a.is_meta
    ):
        return True
    return bool(torch.equal(a.detach(), b.detach().to(device=a.device, dtype=a.dtype)))


def _is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every element is finite. A finite sum proves it (any NaN or inf makes the sum NaN or
    inf) and is one fast reduction; only a non-finite sum (or an overflow) needs the elementwise test."""
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def _span(t: torch.Tensor) -> tuple[int, int]:
    """Byte range ``[start, end)`` that a non-empty tensor's elements occupy."""
    start = t.data_ptr()
    last = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride(), strict=True))
    return start, start + (last + 1) * t.element_size()


def _plan(
    live_model: nn.Module, new_state: Mapping[str, Any], strict: bool
) -> tuple[list[tuple[torch.Tensor, torch.Tensor, str, int]], list[str], list[str]]:
    """Structural validation. Returns ``[(live tensor, source tensor, first key, number of keys)]``
    (one per distinct live tensor), the missing and the unexpected keys. Raises on any problem."""
    live, extra = _state_entries(live_model)
    if strict and extra:
        raise ValueError(
            f"swap_weights: the live model has extra state ({_keys_text(extra)}), which is not a tensor and "
            "cannot be swapped by pointer; use load_state_dict, or strict=False to leave it unchanged"
        )
    missing = [k for k in live if k not in new_state]
    unexpected = [k for k in new_state if k not in live]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys {_keys_text(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_keys_text(unexpected)}")
        raise ValueError(f"swap_weights: new_state does not match the live model (strict=True): {'; '.join(parts)}")

    # keys naming one live tensor object (tied / shared parameters) form one group, swapped once
    groups: dict[int, list[str]] = {}
    for key, t in live.items():
        groups.setdefault(id(t), []).append(key)

    # distinct live tensors whose memory overlaps would come apart when repointed one by one
    spans = sorted(
        (str(live[keys[0]].device), *_span(live[keys[0]]), keys[0])
        for keys in groups.values()
        if live[keys[0]].numel() and not live[keys[0]].is_meta
    )
    for (dev_a, _, end_a, key_a), (dev_b, start_b, _, key_b) in zip(spans, spans[1:], strict=False):
        if dev_a == dev_b and start_b < end_a:
            raise ValueError(
                f"swap_weights: {key_a!r} and {key_b!r} are distinct tensors sharing memory in the live model; "
                "repointing them one by one would separate them (use load_state_dict for this model)"
            )

    plan: list[tuple[torch.Tensor, torch.Tensor, str, int]] = []
    for keys in groups.values():
        target = live[keys[0]]
        given = [k for k in keys if k in new_state]
        if not given:
            continue
        for k in given:
            src = new_state[k]
            if not isinstance(src, torch.Tensor):
                raise TypeError(f"swap_weights: new_state[{k!r}] is a {type(src).__name__}, not a tensor")
            if src.shape != target.shape:
                raise ValueError(
                    f"swap_weights: shape mismatch for {k!r}: new_state has {list(src.shape)}, "
                    f"the live model has {list(target.shape)}"
                )
            if src.dtype != target.dtype and not (_is_float(src) and _is_float(target)):
                raise ValueError(
                    f"swap_weights: dtype mismatch for {k!r}: new_state has {src.dtype}, the live model has "
                    f"{target.dtype} (only floating-point tensors are cast)"
                )
            if src.layout != torch.strided or target.layout != torch.strided:
                raise ValueError(f"swap_weights: {k!r} is not a dense (strided) tensor; only dense tensors are swapped")
            if src.is_meta:
                raise ValueError(f"swap_weights: new_state[{k!r}] is on the meta device (it has no values)")
        first = new_state[given[0]]
        for k in given[1:]:
            if not _same_values(first, new_state[k]):
                raise ValueError(
                    f"swap_weights: {given[0]!r} and {k!r} are the same (tied) tensor in the live model, but "
                    "new_state gives them different values"
                )
        plan.append((target, first, given[0], len(given)))
    return plan, missing, unexpected


def swap_weights(
    live_model: nn.Module | ServedModel,
    new_state: Mapping[str, torch.Tensor] | nn.Module,
    *,
    lock: RWLock | None = None,
    strict: bool = True,
    check_finite: bool = True,
    timeout: float | None = None,
) -> SwapStats:
    """Replace the weights of a served model in place, pausing its readers for a pointer swap only.

    1. Validate ``new_state`` (a ``state_dict``-like mapping ``{key: Tensor}``, or an ``nn.Module``
       whose ``state_dict()`` is used) against ``live_model``'s ``state_dict`` keys: with ``strict``
       no key may be missing or unexpected; every given tensor must have the live shape, and the
       live dtype unless both are floating point (then it is cast, as ``load_state_dict`` does);
       keys tied to one live tensor (``lm_head.weight`` / ``embed_tokens.weight``) must agree; with
       ``check_finite`` floating values must be finite after the cast (NaN/inf, or an overflow of a
       half-precision model, is refused).
    2. Stage a private copy of every new tensor on the live tensor's device, dtype and strides.
    3. Under the write lock (``lock``, default :func:`model_lock` of the model), repoint every live
       parameter and buffer at its staged storage (``tensor.data = staged``). Parameter objects,
       ``requires_grad``, hooks and optimizer references stay the same; tied parameters stay tied.
    4. Release the lock, then free the old storage.

    Any error in 1-2 leaves the live model untouched and the lock never taken. The caller's tensors
    are copied, never aliased: changing them afterwards does not change the model, and vice versa.
    Non-persistent buffers (not in ``state_dict``) are left alone, and so are optimizer state
    (momenta, Adam moments refer to the old weights: reset or rebuild the optimizer when training
    continues) and ``.grad``. Peak memory: the live model plus one staged copy of what is swapped.
    Do not swap while an autograd graph through the model awaits ``backward``.

    Args:
        live_model: the served ``nn.Module`` (or a :class:`ServedModel`, whose model and lock are used).
        new_state: the new values.
        lock: the lock the model's readers hold (default: ``model_lock(live_model)``).
        strict: require exactly the live model's keys; with False, missing keys keep their values and
            unexpected keys are ignored (both are listed in the result).
        check_finite: refuse NaN/inf in floating-point values.
        timeout: seconds to wait for the write lock; :class:`TimeoutError` (model untouched) after.

    Returns:
        :class:`SwapStats`: ``pause_s`` (write lock held), ``wait_s`` (waiting for readers),
        ``validate_s``, ``staging_s``, ``release_s``, ``total_s`` (seconds), ``tensors``, ``keys``,
        ``bytes`` swapped, and the missing / unexpected keys.

    Raises:
        TypeError: ``new_state`` is neither a mapping nor a module, or holds a non-tensor value.
        ValueError: missing/unexpected keys (strict), shape or integer dtype mismatch, disagreeing
            tied values, non-finite values; the message names the key.
        TimeoutError: the write lock was not acquired within ``timeout``.
    """
    t_start = time.perf_counter()
    if isinstance(live_model, ServedModel):
        lock = lock if lock is not None else live_model.lock
        live_model = live_model.model
    if not isinstance(live_model, nn.Module):
        raise TypeError(f"swap_weights: live_model must be an nn.Module, got {type(live_model).__name__}")
    if isinstance(new_state, nn.Module):
        new_state = new_state.state_dict()
    if not isinstance(new_state, Mapping):
        raise TypeError(f"swap_weights: new_state must be a mapping or an nn.Module, got {type(new_state).__name__}")
    lock = lock if lock is not None else model_lock(live_model)

    plan, missing, unexpected = _plan(live_model, new_state, strict)
    validate_s = time.perf_counter() - t_start

    staging_s = 0.0
    staged: list[torch.Tensor] = []
    with torch.no_grad():
        for target, src, key, _ in plan:
            t0 = time.perf_counter()
            new = torch.empty_like(target.detach(), memory_format=torch.preserve_format)
            new.copy_(src.detach())
            t1 = time.perf_counter()
            staging_s += t1 - t0
            if check_finite and _is_float(new) and not _all_finite(new):
                what = "NaN or inf" if src.dtype == new.dtype else f"NaN or inf (after the cast to {new.dtype})"
                raise ValueError(f"swap_weights: new_state[{key!r}] contains {what}")
            validate_s += time.perf_counter() - t1
            staged.append(new)
    old = [target.detach() for target, _, _, _ in plan]  # keeps the old storage alive past the lock

    t_wait = time.perf_counter()
    if not lock.acquire_write(timeout):
        raise TimeoutError(f"swap_weights: the write lock was not acquired within {timeout} s; model unchanged")
    t_locked = time.perf_counter()
    done = 0
    try:
        for (target, _, _, _), new in zip(plan, staged, strict=True):
            target.data = new
            done += 1
    except BaseException:
        for (target, _, _, _), prev in zip(plan[:done], old, strict=False):
            target.data = prev  # all or nothing: put back what was already repointed
        raise
    finally:
        lock.release_write()
    t_unlocked = time.perf_counter()
    nbytes = sum(t.numel() * t.element_size() for t in staged)
    del old, staged  # the old storage is freed here, outside the lock
    t_end = time.perf_counter()
    return SwapStats(
        pause_s=t_unlocked - t_locked,
        wait_s=t_locked - t_wait,
        validate_s=validate_s,
        staging_s=staging_s,
        release_s=t_end - t_unlocked,
        total_s=t_end - t_start,
        tensors=len(plan),
        keys=sum(n for _, _, _, n in plan),
        bytes=nbytes,
        missing_keys=missing,
        unexpected_keys=unexpected,
    )
