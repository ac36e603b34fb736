"""diagonal_fisher against an independent per-sample autograd loop (one backward per sample)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn as nn

from unlearn_ext.fisher import causal_lm_targets, diagonal_fisher, per_sample_cross_entropy

# benchmarks/gpu_check.sh sets UNLEARN_EXT_TEST_DEVICE=cuda to run the model tests on the GPU kernels.
DEVICE = torch.device(os.environ.get("UNLEARN_EXT_TEST_DEVICE", "cpu"))


def loop_fisher(model, batches, *, num_groups=1, group_of=None, loss_fn=per_sample_cross_entropy, params=None):
    """sum over samples of (d loss_b / d theta)**2, one autograd backward per sample, float64."""
    named = {n: p for n, p in model.named_parameters() if params is None or n in params}
    out = {n: torch.zeros(num_groups, *p.shape, dtype=torch.float64, device=p.device) for n, p in named.items()}
    for inputs, targets in batches:
        for b in range(targets.shape[0]):
            inp = {k: v[b : b + 1] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[b : b + 1]
            res = model(**inp) if isinstance(inp, dict) else model(inp)
            loss = loss_fn(res, targets[b : b + 1]).sum()
            grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
            k = 0 if group_of is None else int(group_of(targets)[b])
            for n, g in zip(named, grads, strict=True):
                if g is not None:
                    out[n][k] += g.double().square()
    return out if num_groups > 1 else {n: t[0] for n, t in out.items()}


def assert_fisher_close(actual, expected, rtol):
    assert set(actual) == set(expected), (sorted(actual), sorted(expected))
    for name, exp in expected.items():
        got, exp = actual[name].double().cpu(), exp.cpu()
        assert got.shape == exp.shape, (name, got.shape, exp.shape)
        scale = exp.abs().max().clamp_min(1e-30)
        err = ((got - exp).abs().max() / scale).item()
        assert err <= rtol, f"{name}: relative error {err:.3g} > {rtol}"


def small_cnn() -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 6, 3, stride=2, groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 6 * 6, 10),
    )
    with torch.no_grad():
        bn = model[1]
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    return model.eval().double().to(DEVICE)


def cnn_batches(n=2, b=5):
    return [
        (torch.randn(b, 1, 14, 14, dtype=torch.float64, device=DEVICE), torch.randint(0, 10, (b,), device=DEVICE))
        for _ in range(n)
    ]


def tiny_llama(tied: bool):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        max_position_embeddings=64,
    )
    torch.manual_seed(2)
    return transformers.LlamaForCausalLM(cfg).eval().double().to(DEVICE)


def test_cnn_matches_per_sample_loop():
    model, batches = small_cnn(), cnn_batches()
    assert_fisher_close(diagonal_fisher(model, batches), loop_fisher(model, batches), 1e-10)


def test_cnn_per_class_fisher_in_one_pass_equals_per_class_loop():
    model, batches = small_cnn(), cnn_batches(n=3, b=8)
    fisher, counts = diagonal_fisher(model, batches, groups="targets", num_groups=10, return_counts=True)
    expected = loop_fisher(model, batches, num_groups=10, group_of=lambda t: t)
    assert_fisher_close(fisher, expected, 1e-10)
    labels = torch.cat([t for _, t in batches]).cpu()
    assert torch.equal(counts, torch.bincount(labels, minlength=10))
    # and it equals running the pass once per class on that class's samples only
    labels = labels.to(DEVICE)
    for k in labels.unique().tolist()[:3]:
        only_k = [(x[t == k], t[t == k]) for x, t in batches if (t == k).any()]
        per_k = diagonal_fisher(model, only_k)
        for name in per_k:
            torch.testing.assert_close(fisher[name][k], per_k[name], rtol=1e-10, atol=1e-12)


def test_group_ids_from_callable_and_third_batch_item():
    model, batches = small_cnn(), cnn_batches()
    by_fn = diagonal_fisher(model, batches, groups=lambda x, t: t % 3, num_groups=3)
    by_item = diagonal_fisher(model, [(x, t, t % 3) for x, t in batches], num_groups=3)
    expected = loop_fisher(model, batches, num_groups=3, group_of=lambda t: t % 3)
    assert_fisher_close(by_fn, expected, 1e-10)
    assert_fisher_close(by_item, expected, 1e-10)


def test_batch_granularity_is_square_of_summed_gradient():
    model, batches = small_cnn(), cnn_batches()
    fisher = diagonal_fisher(model, batches, granularity="batch")
    names = dict(model.named_parameters())
    expected = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in names.items()}
    for x, t in batches:
        loss = per_sample_cross_entropy(model(x), t).sum()
        for (n, _), g in zip(names.items(), torch.autograd.grad(loss, list(names.values())), strict=True):
            expected[n] += g.double().square()
    assert_fisher_close(fisher, expected, 1e-10)


def test_batch_granularity_with_groups_squares_each_groups_gradient():
    model, batches = small_cnn(), cnn_batches(n=1, b=8)
    fisher = diagonal_fisher(model, batches, granularity="batch", groups=lambda x, t: t % 2, num_groups=2)
    names = dict(model.named_parameters())
    x, t = batches[0]
    for k in (0, 1):
        sel = t % 2 == k
        loss = per_sample_cross_entropy(model(x[sel]), t[sel]).sum()
        for (n, _), g in zip(names.items(), torch.autograd.grad(loss, list(names.values())), strict=True):
            torch.testing.assert_close(fisher[n][k], g.double().square(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_llama_matches_per_sample_loop(tied):
    model = tiny_llama(tied)
    ids = torch.randint(0, 97, (3, 9), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # a padded sample
    batches = [({"input_ids": ids, "attention_mask": mask}, causal_lm_targets(ids, mask))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fisher = diagonal_fisher(model, batches)
    messages = " ".join(str(w.message) for w in caught)
    assert ("tied parameters ['model.embed_tokens.weight']" in messages) == tied
    assert_fisher_close(fisher, loop_fisher(model, batches), 1e-9)


def test_unsupported_layer_uses_exact_fallback_with_warning():
    class WithBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.randn(8, dtype=torch.float64))
            self.lin = nn.Linear(8, 4).double()

        def forward(self, x):
            return self.lin(torch.tanh(x * self.scale))

    model = WithBias()
    batches = [(torch.randn(6, 8, dtype=torch.float64), torch.randint(0, 4, (6,)))]
    with pytest.warns(UserWarning, match=r"unsupported layers \['scale'\]"):
        fisher = diagonal_fisher(model, batches)
    assert_fisher_close(fisher, loop_fisher(model, batches), 1e-10)


def test_layer_called_twice_per_forward_sums_its_contributions():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 6, padding_idx=0).double()
            self.norm = nn.LayerNorm(6).double()
            self.lin = nn.Linear(6, 6).double()
            self.head = nn.Linear(6, 5).double()

        def forward(self, ids):
            h = self.norm(self.emb(ids))
            h = self.lin(torch.relu(self.lin(h)))  # same Linear twice
            return self.head(h.mean(1))

    torch.manual_seed(3)
    model = Twice()
    ids = torch.randint(0, 11, (4, 7))
    ids[0, :3] = 0
    ids[1, 1] = ids[1, 4]  # a repeated id inside a sample
    batches = [(ids, torch.randint(0, 5, (4,)))]
    assert_fisher_close(diagonal_fisher(model, batches), loop_fisher(model, batches), 1e-10)


def test_token_granularity_is_sum_of_per_token_outer_products():
    torch.manual_seed(4)
    lin = nn.Linear(5, 3).double()
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    targets = torch.randint(0, 3, (2, 4))
    fisher = diagonal_fisher(lin, [(x, targets)], granularity="token")
    xr = x.clone().requires_grad_()
    y = lin(xr)
    g = torch.autograd.grad(per_sample_cross_entropy(y, targets).sum(), y)[0]
    exp_w = torch.einsum("bto,bti->btoi", g, x).square().sum((0, 1))
    exp_b = g.square().sum((0, 1))
    torch.testing.assert_close(fisher["weight"].double(), exp_w)
    torch.testing.assert_close(fisher["bias"].double(), exp_b)


def test_sampled_labels_are_seeded_and_equal_empirical_fisher_of_the_draws():
    model, batches = small_cnn(), cnn_batches(n=1, b=6)
    a = diagonal_fisher(model, batches, labels="sampled", seed=7)
    b = diagonal_fisher(model, batches, labels="sampled", seed=7)
    c = diagonal_fisher(model, batches, labels="sampled", seed=8)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0)
    assert any(not torch.allclose(a[n], c[n]) for n in a)
    x, _ = batches[0]
    with torch.no_grad():
        probs = torch.softmax(model(x).float(), -1)
    draws = torch.multinomial(probs.cpu(), 1, generator=torch.Generator().manual_seed(7)).view(-1).to(DEVICE)
    assert_fisher_close(a, loop_fisher(model, [(x, draws)]), 1e-10)


def test_hf_conv1d_gpt2_matches_loop():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=53, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(5)
    model = transformers.GPT2LMHeadModel(cfg).eval().double()
    ids = torch.randint(0, 53, (2, 6))
    batches = [(ids, causal_lm_targets(ids))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fisher = diagonal_fisher(model, batches)
    assert_fisher_close(fisher, loop_fisher(model, batches), 1e-9)


def test_does_not_touch_requires_grad_or_grad_and_respects_params():
    model, batches = small_cnn(), cnn_batches(n=1)
    model[0].weight.requires_grad_(False)
    model[6].weight.grad = torch.ones_like(model[6].weight)
    fisher = diagonal_fisher(model, batches)
    assert "0.weight" not in fisher
    assert model[0].weight.requires_grad is False and model[6].weight.requires_grad is True
    assert torch.equal(model[6].weight.grad, torch.ones_like(model[6].weight))
    only = diagonal_fisher(model, batches, params=["6.bias"])
    assert list(only) == ["6.bias"]
    torch.testing.assert_close(only["6.bias"], fisher["6.bias"])


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_float32_model_and_backends(backend):
    model = small_cnn().float()
    batches = [(x.float(), t) for x, t in cnn_batches()]
    expected = loop_fisher(model, batches)
    assert_fisher_close(diagonal_fisher(model, batches, backend=backend), expected, 1e-4)


def test_bad_inputs_raise_clear_errors():
    model, batches = small_cnn(), cnn_batches(n=1)
    with pytest.raises(ValueError, match="batch 1: non-finite per-sample loss"):
        bad = [
            batches[0],
            (torch.full((2, 1, 14, 14), float("nan"), dtype=torch.float64), torch.zeros(2).long()),
        ]
        diagonal_fisher(model, bad)
    with pytest.raises(ValueError, match="no samples"):
        diagonal_fisher(model, [])
    with pytest.raises(ValueError, match="granularity"):
        diagonal_fisher(model, batches, granularity="layer")
    with pytest.raises(ValueError, match="labels"):
        diagonal_fisher(model, batches, labels="true")
    with pytest.raises(ValueError, match="num_groups"):
        diagonal_fisher(model, batches, groups="targets", num_groups=3)
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        diagonal_fisher(model, batches, loss_fn=lambda out, t: per_sample_cross_entropy(out, t).sum())
    with pytest.raises(ValueError, match="default cross-entropy"):
        diagonal_fisher(model, batches, labels="sampled", loss_fn=per_sample_cross_entropy)
    with pytest.raises(ValueError, match="unknown parameter names"):
        diagonal_fisher(model, batches, params=["nope"])
    with pytest.raises(ValueError, match=r"\(inputs, targets\)"):
        diagonal_fisher(model, [torch.randn(2, 1, 14, 14)])
    with pytest.raises(ValueError, match="BatchNorm '1'.*model.eval"):
        diagonal_fisher(small_cnn().train(), batches)
    with pytest.raises(NotImplementedError, match="no token axis"):
        diagonal_fisher(model, batches, granularity="token")
    with pytest.raises(ValueError, match="group ids must be in"):
        diagonal_fisher(model, [(x, t, t + 100) for x, t in batches], num_groups=10)


@pytest.mark.hf
@pytest.mark.slow
def test_real_smollm2_matches_loop_on_selected_layers():
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from unlearn_ext.models import load_smollm2

    try:
        model, tok = load_smollm2()
    except ModuleNotFoundError as exc:
        pytest.skip(str(exc))
    enc = tok(["The capital of France is Paris.", "Seven is an odd number."], return_tensors="pt", padding=True)
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    batches = [(inputs, causal_lm_targets(enc["input_ids"], enc["attention_mask"]))]
    params = [
        "model.layers.29.mlp.down_proj.weight",
        "model.layers.29.input_layernorm.weight",
        "model.norm.weight",
    ]
    fisher = diagonal_fisher(model, batches, params=params)
    assert_fisher_close(fisher, loop_fisher(model, batches, params=params), 2e-4)
