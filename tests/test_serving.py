"""unlearn_ext.serving: the readers-writer lock, and weight swaps that readers never see half-done.

Small CPU models only (a BatchNorm MLP, a tiny conv net, a tied-embedding LM); the concurrency tests
use short loops and timeouts, so the file takes a few seconds on two cores.
"""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
from torch import nn

from unlearn_ext.serving import RWLock, ServedModel, SwapStats, model_lock, swap_weights

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------
# models and states
# --------------------------------------------------------------------------------------------


class Net(nn.Module):
    """Linear -> BatchNorm -> ReLU -> Linear -> ReLU -> Linear: parameters and buffers."""

    def __init__(self, d_in: int = 16, hidden: int = 64, d_out: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.bn(self.fc1(x))))))


class TiedLM(nn.Module):
    """Embedding whose weight is also the output head's (``head.weight is emb.weight``)."""

    def __init__(self, vocab: int = 50, dim: int = 12) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mid = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(self.emb(ids))))


def make_net(seed: int, **kw) -> Net:
    """A Net with seeded weights and non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    net = Net(**kw)
    net.train()
    with torch.no_grad():
        net(torch.randn(64, net.fc1.in_features) * (1 + seed))
    return net.eval()


def cloned_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Same keys, dtypes, shapes and bytes."""
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


class CountingLock(RWLock):
    """An RWLock that counts write acquisitions (to show validation fails before the lock)."""

    def __init__(self) -> None:
        super().__init__()
        self.write_calls = 0

    def acquire_write(self, timeout: float | None = None) -> bool:
        self.write_calls += 1
        return super().acquire_write(timeout)


X = torch.randn(32, 16, generator=torch.Generator().manual_seed(123))


# --------------------------------------------------------------------------------------------
# swap_weights: results
# --------------------------------------------------------------------------------------------


def test_swap_matches_a_fresh_model_loaded_with_the_new_state():
    live, new = make_net(0), make_net(1)
    fresh = Net().eval()
    fresh.load_state_dict(new.state_dict())
    params_before = {n: p for n, p in live.named_parameters()}
    stats = swap_weights(live, new.state_dict())

    assert isinstance(stats, SwapStats)
    with torch.no_grad():
        assert torch.equal(live(X), fresh(X))
        assert not torch.equal(live(X), make_net(0)(X))
    assert states_equal(cloned_state(live), cloned_state(fresh))  # buffers (BatchNorm stats) included
    # same Parameter objects (optimizers keep working), requires_grad kept
    for n, p in live.named_parameters():
        assert p is params_before[n] and p.requires_grad and type(p) is nn.Parameter
    n_state = len(live.state_dict())
    assert stats.tensors == stats.keys == n_state
    assert stats.bytes == sum(v.numel() * v.element_size() for v in live.state_dict().values())
    assert 0 <= stats.pause_s <= stats.total_s and stats.staging_s >= 0 and stats.wait_s >= 0
    assert stats.missing_keys == [] and stats.unexpected_keys == []


def test_swap_accepts_a_module_a_served_model_and_casts_floating_dtypes():
    live, new = make_net(0), make_net(1)
    served = ServedModel(live)
    swap_weights(served, new)  # a module as new_state, a ServedModel as the live model
    assert torch.equal(served(X), new(X))

    # float64 values into a float32 model are cast, as load_state_dict does
    new64 = {k: (v.double() if v.is_floating_point() else v) for k, v in make_net(2).state_dict().items()}
    swap_weights(live, new64)
    ref = Net().eval()
    ref.load_state_dict(new64)
    assert all(p.dtype == torch.float32 for p in live.parameters())
    assert states_equal(cloned_state(live), cloned_state(ref))


def test_caller_tensors_are_copied_not_aliased():
    live = make_net(0)
    new_state = cloned_state(make_net(1))
    kept = {k: v.clone() for k, v in new_state.items()}
    swap_weights(live, new_state)
    live_ptrs = {t.data_ptr() for t in live.state_dict().values()}
    assert live_ptrs.isdisjoint(t.data_ptr() for t in new_state.values())

    for v in new_state.values():  # the caller reuses its buffers: the model must not change
        v.add_(7) if v.is_floating_point() else v.add_(3)
    assert states_equal(cloned_state(live), kept)

    edited = {k: v.clone() for k, v in new_state.items()}
    with torch.no_grad():  # and changing the model does not reach the caller's tensors
        for t in live.state_dict().values():
            t.mul_(-1) if t.is_floating_point() else t.add_(1)
    assert states_equal(new_state, edited)


def test_outputs_taken_before_a_swap_keep_their_values():
    """Storage is replaced, not overwritten: a tensor aliasing an old parameter is unaffected."""
    live = make_net(0)
    alias = live.fc1.weight.detach()
    before = alias.clone()
    swap_weights(live, make_net(1).state_dict())
    assert torch.equal(alias, before) and not torch.equal(live.fc1.weight, before)


def test_strides_and_optimizer_survive_a_swap():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    stride = conv.weight.stride()
    new = nn.Conv2d(3, 8, 3).state_dict()
    opt = torch.optim.SGD(conv.parameters(), lr=0.1)
    swap_weights(conv, new)
    assert conv.weight.stride() == stride and torch.equal(conv.weight, new["weight"])

    conv(torch.randn(2, 3, 6, 6)).sum().backward()
    expected = conv.weight.detach() - 0.1 * conv.weight.grad
    opt.step()  # the optimizer still updates the live (swapped) parameter
    torch.testing.assert_close(conv.weight.detach(), expected)
    assert not torch.equal(conv.weight.detach(), new["weight"])


def test_non_strict_keeps_missing_keys_and_ignores_unexpected_ones():
    live, new = make_net(0), make_net(1)
    before = cloned_state(live)
    partial = {k: v for k, v in new.state_dict().items() if k.startswith("fc1.")}
    partial["not.a.key"] = torch.zeros(3)
    stats = swap_weights(live, partial, strict=False)
    after = cloned_state(live)
    assert torch.equal(after["fc1.weight"], new.fc1.weight) and torch.equal(after["fc1.bias"], new.fc1.bias)
    assert all(torch.equal(after[k], before[k]) for k in before if not k.startswith("fc1."))
    assert stats.unexpected_keys == ["not.a.key"] and "fc2.weight" in stats.missing_keys
    assert stats.tensors == 2


# --------------------------------------------------------------------------------------------
# swap_weights: bad inputs fail before the lock, and leave the model byte-identical
# --------------------------------------------------------------------------------------------


def _bad(kind: str, good: dict[str, torch.Tensor]) -> dict:
    s = dict(good)
    if kind == "missing":
        del s["fc2.bias"]
    elif kind == "unexpected":
        s["fc4.weight"] = torch.zeros(2, 2)
    elif kind == "shape":
        s["fc2.weight"] = torch.zeros(64, 63)
    elif kind == "int_dtype":
        s["bn.num_batches_tracked"] = s["bn.num_batches_tracked"].float()
    elif kind == "float_to_int":
        s["fc3.bias"] = s["fc3.bias"].long()
    elif kind == "nan":
        s["fc3.weight"] = s["fc3.weight"].clone()
        s["fc3.weight"][1, 2] = float("nan")
    elif kind == "inf_in_buffer":  # a buffer, found after several tensors were already staged
        s["bn.running_var"] = s["bn.running_var"].clone()
        s["bn.running_var"][0] = float("inf")
    elif kind == "not_a_tensor":
        s["fc1.bias"] = [0.0] * 64
    return s


BAD_CASES = {
    "missing": (ValueError, "missing keys 'fc2.bias'"),
    "unexpected": (ValueError, "unexpected keys 'fc4.weight'"),
    "shape": (ValueError, r"shape mismatch for 'fc2.weight'.*\[64, 63\]"),
    "int_dtype": (ValueError, "dtype mismatch for 'bn.num_batches_tracked'"),
    "float_to_int": (ValueError, "dtype mismatch for 'fc3.bias'"),
    "nan": (ValueError, r"new_state\['fc3.weight'\] contains NaN or inf"),
    "inf_in_buffer": (ValueError, r"new_state\['bn.running_var'\] contains NaN or inf"),
    "not_a_tensor": (TypeError, r"new_state\['fc1.bias'\] is a list"),
}


@pytest.mark.parametrize("kind", list(BAD_CASES))
def test_bad_new_state_raises_and_leaves_the_model_untouched(kind):
    live = make_net(0)
    before = cloned_state(live)
    ptrs = {k: v.data_ptr() for k, v in live.state_dict().items()}
    lock = CountingLock()
    exc, match = BAD_CASES[kind]
    with pytest.raises(exc, match=match):
        swap_weights(live, _bad(kind, cloned_state(make_net(1))), lock=lock)
    assert states_equal(cloned_state(live), before)
    assert {k: v.data_ptr() for k, v in live.state_dict().items()} == ptrs
    assert lock.write_calls == 0 and not lock.writer_active


def test_overflow_when_casting_to_half_is_refused():
    live = make_net(0).half()
    before = cloned_state(live)
    new = cloned_state(make_net(1))
    new["fc2.weight"][0, 0] = 1e6  # finite in float32, inf in float16
    with pytest.raises(ValueError, match=r"'fc2.weight'.*after the cast to torch.float16"):
        swap_weights(live, new)
    assert states_equal(cloned_state(live), before)


def test_huge_finite_values_are_accepted():
    """The finiteness check's fast path (a finite sum) must not refuse values whose sum overflows."""
    live = make_net(0)
    new = cloned_state(make_net(1))
    new["fc2.weight"][0, :4] = 3e38  # finite; their float32 sum is inf
    swap_weights(live, new)
    assert torch.equal(live.fc2.weight, new["fc2.weight"])


def test_bad_arguments_and_a_timed_out_lock():
    live = make_net(0)
    before = cloned_state(live)
    with pytest.raises(TypeError, match="mapping or an nn.Module"):
        swap_weights(live, [("fc1.weight", torch.zeros(1))])
    with pytest.raises(TypeError, match="live_model must be an nn.Module"):
        swap_weights(cloned_state(live), cloned_state(live))
    lock = model_lock(live)
    lock.acquire_read()  # a reader that does not finish in time
    try:
        result: list[BaseException] = []

        def swapper():
            try:
                swap_weights(live, make_net(1).state_dict(), timeout=0.05)
            except BaseException as e:  # noqa: BLE001 - reported to the main thread
                result.append(e)

        t = threading.Thread(target=swapper)
        t.start()
        t.join(5)
    finally:
        lock.release_read()
    assert len(result) == 1 and isinstance(result[0], TimeoutError)
    assert states_equal(cloned_state(live), before) and lock.writers_waiting == 0


# --------------------------------------------------------------------------------------------
# tied and shared tensors
# --------------------------------------------------------------------------------------------


def test_tied_weights_stay_tied():
    torch.manual_seed(0)
    live, new = TiedLM(), TiedLM()
    ids = torch.randint(0, 50, (3, 7))
    stats = swap_weights(live, new.state_dict())
    assert live.head.weight is live.emb.weight  # still one Parameter
    assert stats.tensors == len(new.state_dict()) - 1 and stats.keys == len(new.state_dict())
    with torch.no_grad():
        assert torch.equal(live(ids), new(ids))
        live.emb.weight.add_(1.0)  # an update through one name is seen through the other
    assert torch.equal(live.head.weight, live.emb.weight)

    # only one of the tied keys given (strict=False): both names get it
    emb_only = {"emb.weight": torch.randn(50, 12)}
    swap_weights(live, emb_only, strict=False)
    assert torch.equal(live.head.weight, emb_only["emb.weight"]) and live.head.weight is live.emb.weight


def test_tied_keys_with_different_values_are_refused():
    torch.manual_seed(0)
    live = TiedLM()
    new = cloned_state(TiedLM())  # cloned: the two keys are now distinct tensors, still equal
    swap_weights(live, new)  # equal values: fine
    before = cloned_state(live)
    new["head.weight"] = new["head.weight"] + 1
    with pytest.raises(ValueError, match="'emb.weight' and 'head.weight' are the same \\(tied\\) tensor"):
        swap_weights(live, new)
    assert states_equal(cloned_state(live), before)


def test_distinct_tensors_sharing_memory_are_refused():
    lin = nn.Linear(4, 4)
    lin.register_buffer("w_view", lin.weight.detach()[0])  # a buffer viewing the weight's first row
    before = cloned_state(lin)
    new = {k: v + 1 for k, v in cloned_state(lin).items()}
    with pytest.raises(ValueError, match="are distinct tensors sharing memory") as info:
        swap_weights(lin, new)
    assert "'weight'" in str(info.value) and "'w_view'" in str(info.value)
    assert states_equal(cloned_state(lin), before)


# --------------------------------------------------------------------------------------------
# model_lock and ServedModel
# --------------------------------------------------------------------------------------------


def test_model_lock_is_per_model_and_invisible_to_the_module():
    a, b = Net(), Net()
    assert model_lock(a) is model_lock(a) and model_lock(a) is not model_lock(b)
    assert ServedModel(a).lock is model_lock(a)
    keys = set(a.state_dict())
    copy.deepcopy(a)  # a lock stored on the module would make this fail (locks cannot be copied)
    assert set(a.state_dict()) == keys and not any(isinstance(v, RWLock) for v in vars(a).values())
    with pytest.raises(TypeError):
        model_lock({"not": "a module"})


def test_served_model_runs_without_grad_under_the_read_lock():
    net = make_net(0)
    seen = []
    net.register_forward_pre_hook(lambda m, i: seen.append((model_lock(m).readers, torch.is_grad_enabled())))
    served = ServedModel(net)
    out = served(X)
    assert seen == [(1, False)] and not out.requires_grad and served.lock.readers == 0
    with served.reading():
        assert torch.equal(served.infer(X), out)  # nested read: re-entrant


# --------------------------------------------------------------------------------------------
# RWLock
# --------------------------------------------------------------------------------------------


def test_rwlock_readers_run_concurrently():
    lock = RWLock()
    barrier = threading.Barrier(3, timeout=5)  # only passes when 3 readers hold the lock together
    peak, errors = [], []

    def reader():
        try:
            with lock.reading():
                barrier.wait()
                peak.append(lock.readers)
                barrier.wait()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors and peak == [3, 3, 3] and lock.readers == 0


def test_rwlock_writer_is_exclusive_and_preferred():
    lock = RWLock()
    events: list[str] = []
    reader_in, release_reader = threading.Event(), threading.Event()

    def first_reader():
        with lock.reading():
            reader_in.set()
            release_reader.wait(5)
            events.append("r1 out")

    def writer():
        with lock.writing():
            events.append("w in")
            assert lock.readers == 0
            time.sleep(0.05)
            events.append("w out")

    def late_reader():
        with lock.reading():
            events.append("r2 in")

    r1 = threading.Thread(target=first_reader)
    r1.start()
    assert reader_in.wait(5)
    w = threading.Thread(target=writer)
    w.start()
    deadline = time.monotonic() + 5
    while lock.writers_waiting == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert lock.writers_waiting == 1 and not lock.writer_active  # waits for the reader in flight
    r2 = threading.Thread(target=late_reader)
    r2.start()
    time.sleep(0.05)
    assert "r2 in" not in events  # a reader arriving after the writer queues behind it
    assert not lock.acquire_read(timeout=0.01)  # (so does this thread)
    release_reader.set()
    for t in (r1, w, r2):
        t.join(5)
    assert events == ["r1 out", "w in", "w out", "r2 in"]

    with lock.writing():  # exclusive: neither readers nor writers get in meanwhile
        got = []
        t = threading.Thread(target=lambda: got.extend([lock.acquire_read(0.02), lock.acquire_write(0.02)]))
        t.start()
        t.join(5)
        assert got == [False, False]
    assert lock.readers == 0 and lock.writers_waiting == 0 and not lock.writer_active


def test_rwlock_back_to_back_writers_do_not_starve_readers():
    """Each write release lets the readers queued by then in before the next writer."""
    lock = RWLock()
    stop = threading.Event()
    reads = [0]

    def reader():
        while not stop.is_set():
            with lock.reading():
                reads[0] += 1
                time.sleep(0.0002)

    def writer():
        for _ in range(300):  # back to back: the next request comes right after each release
            with lock.writing():
                time.sleep(0.0002)

    r, w = threading.Thread(target=reader), threading.Thread(target=writer)
    r.start()
    w.start()
    w.join(30)
    stop.set()
    r.join(5)
    assert reads[0] >= 100, reads  # about one read per write; without the hand-off, a handful


def test_rwlock_misuse_raises_instead_of_deadlocking():
    lock = RWLock()
    with lock.reading():
        with pytest.raises(RuntimeError, match="no upgrade"):
            lock.acquire_write()
    with lock.writing():
        with pytest.raises(RuntimeError, match="holds the write lock"):
            lock.acquire_read()
        with pytest.raises(RuntimeError, match="not re-entrant"):
            lock.acquire_write()
    with pytest.raises(RuntimeError, match="without a matching"):
        lock.release_read()
    with pytest.raises(RuntimeError, match="does not hold"):
        lock.release_write()
    with pytest.raises(TimeoutError, match="write lock not acquired"):
        with lock.reading(), _write_in_thread(lock, timeout=0.01):  # a writer elsewhere times out
            pass
    assert lock.readers == 0 and lock.writers_waiting == 0


class _write_in_thread:
    """Context manager: try ``lock.writing(timeout)`` in another thread; re-raise its error here."""

    def __init__(self, lock: RWLock, timeout: float) -> None:
        self.lock, self.timeout = lock, timeout

    def __enter__(self) -> None:
        err: list[BaseException] = []

        def run():
            try:
                with self.lock.writing(self.timeout):
                    pass
            except BaseException as e:  # noqa: BLE001
                err.append(e)

        t = threading.Thread(target=run)
        t.start()
        t.join(5)
        if err:
            raise err[0]

    def __exit__(self, *exc) -> None:
        return None


# --------------------------------------------------------------------------------------------
# concurrency: readers only ever see model A or model B
# --------------------------------------------------------------------------------------------


def _ab():
    """A live model and two states whose outputs differ everywhere (the concurrency fixture)."""
    state_a, state_b = cloned_state(make_net(0, hidden=256)), cloned_state(make_net(1, hidden=256))
    live = Net(hidden=256).eval()
    live.load_state_dict(state_a)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out_a = live(x)
        ref = Net(hidden=256).eval()
        ref.load_state_dict(state_b)
        out_b = ref(x)
    return live, state_a, state_b, x, out_a, out_b


def test_concurrent_readers_only_see_a_or_b():
    live, state_a, state_b, x, out_a, out_b = _ab()
    assert not torch.equal(out_a, out_b)
    served = ServedModel(live)
    stop = threading.Event()
    counts, errors = [], []

    def reader():
        n_a = n_b = torn = 0
        try:
            while not stop.is_set() or n_a + n_b + torn < 20:
                out = served(x)
                if torch.equal(out, out_a):
                    n_a += 1
                elif torch.equal(out, out_b):
                    n_b += 1
                else:
                    torn += 1
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        counts.append((n_a, n_b, torn))

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers:
        t.start()
    pauses = []
    for i in range(200):
        pauses.append(swap_weights(live, state_b if i % 2 == 0 else state_a).pause_s)
        if i % 10 == 0:
            time.sleep(0.001)  # let the readers in
    stop.set()
    for t in readers:
        t.join(30)
    assert not errors, errors
    assert len(counts) == 2 and all(torn == 0 for _, _, torn in counts), counts
    total_a, total_b = sum(c[0] for c in counts), sum(c[1] for c in counts)
    assert total_a > 0 and total_b > 0, counts  # both models were really served during the swaps
    with torch.no_grad():
        assert torch.equal(live(x), out_a)  # 200 swaps: ends on A
    assert max(pauses) < 1.0


def test_control_a_half_swapped_model_matches_neither():
    """The check above would catch tearing: a model with half of B's tensors gives neither output."""
    live, state_a, state_b, x, out_a, out_b = _ab()
    keys = list(state_a)
    half = {k: (state_b[k] if i < len(keys) // 2 else state_a[k]) for i, k in enumerate(keys)}
    live.load_state_dict(half)
    with torch.no_grad():
        out = live(x)
    assert not torch.equal(out, out_a) and not torch.equal(out, out_b)


@pytest.mark.parametrize("locked", [False, True])
def test_swap_in_the_middle_of_a_forward(locked):
    """A swap requested while a forward is between fc1 and fc2. Without the shared lock (a swap on an
    unrelated lock) the forward mixes A's fc1 with B's later layers, and the output is neither A's nor
    B's: tearing is real and detectable. With the model's lock the swap waits for the forward."""
    live, state_a, state_b, x, out_a, out_b = _ab()
    in_forward, swapped = threading.Event(), threading.Event()
    armed = [True]

    def hook(module, inputs, output):
        if armed[0]:
            armed[0] = False
            in_forward.set()
            swapped.wait(0.3 if locked else 5)  # locked: the swap cannot finish while we are inside

    live.fc1.register_forward_hook(hook)
    stats: list[SwapStats] = []

    def swapper():
        in_forward.wait(5)
        stats.append(swap_weights(live, state_b, lock=None if locked else RWLock()))
        swapped.set()

    t = threading.Thread(target=swapper)
    t.start()
    out = ServedModel(live)(x)
    t.join(5)
    assert len(stats) == 1
    if locked:
        assert torch.equal(out, out_a)
        assert stats[0].wait_s > 0.1  # the writer waited for the forward in flight
    else:
        assert not torch.equal(out, out_a) and not torch.equal(out, out_b)
    with torch.no_grad():
        assert torch.equal(live(x), out_b)
