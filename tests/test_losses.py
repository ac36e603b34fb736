"""FusedMaskedKLLoss on a (tiny, random-initialised) Hugging Face causal LM: the same loss and
gradients as the plain computation from the model's own logits."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from unlearn_ext import _loader
from unlearn_ext.losses import FusedMaskedKLLoss

transformers = pytest.importorskip("transformers")
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not _loader.has_kernel("fused_linear_masked_kl", "cpu"), reason="C++ kernel absent"),
]

V = 97


@pytest.fixture(scope="module")
def models():
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    cur = copy.deepcopy(ref)
    with torch.no_grad():  # the model being unlearned has drifted from the reference
        for p in cur.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return cur, ref


def _plain(cur_logits, ref_logits, token_mask, vocab_mask, labels, kl_weight, ce_weight):
    s, t = cur_logits[:, :-1].float(), ref_logits[:, :-1].float()
    logq, logp = F.log_softmax(s, -1), F.log_softmax(t, -1)
    kl = (logp.exp() * (logp - logq) * vocab_mask).sum(-1)
    tm = token_mask[:, 1:].float()
    kl = (kl * tm).sum() / tm.sum()
    ce = F.cross_entropy(s.reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    return kl_weight * kl + ce_weight * ce


def test_matches_the_plain_loss_on_the_models_logits(models):
    cur, ref = models
    torch.manual_seed(1)
    ids = torch.randint(0, V, (3, 11))
    token_mask = torch.zeros(3, 11, dtype=torch.bool)
    token_mask[:, 4:7] = True  # "the phrase to forget"
    labels = ids.clone()
    labels[:, :2] = -100  # prompt tokens carry no CE
    vocab_mask = torch.zeros(V, dtype=torch.bool)
    vocab_mask[ids[:, 4:7].flatten()] = True  # the concept's token ids
    loss_fn = FusedMaskedKLLoss(kl_weight=0.7, ce_weight=0.3)

    out = cur(ids, output_hidden_states=True)
    with torch.no_grad():
        ref_out = ref(ids, output_hidden_states=True)
    fused = loss_fn(out.hidden_states[-1], cur.lm_head, ref_out.hidden_states[-1], ref.lm_head,
                    token_mask=token_mask, vocab_mask=vocab_mask, labels=labels)  # fmt: skip
    g_fused = torch.autograd.grad(fused, list(cur.parameters()))

    out = cur(ids)
    plain = _plain(out.logits, ref_out.logits, token_mask, vocab_mask, labels, 0.7, 0.3)
    g_plain = torch.autograd.grad(plain, list(cur.parameters()))
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_fused, g_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in ref.parameters())


def test_reduction_none_keeps_batch_and_shifted_sequence_shape(models):
    cur, ref = models
    ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        h = cur(ids, output_hidden_states=True).hidden_states[-1]
        hr = ref(ids, output_hidden_states=True).hidden_states[-1]
    per_token = FusedMaskedKLLoss(reduction="none")(h, cur.lm_head, hr, ref.lm_head)
    assert per_token.shape == (2, 8)
    mean = FusedMaskedKLLoss()(h, cur.lm_head, hr, ref.lm_head)
    torch.testing.assert_close(per_token.mean(), mean)
    # Unshifted: one row per position; the weight tensor works in place of the module.
    flat = FusedMaskedKLLoss(shift=False, reduction="none")(h[0], cur.lm_head.weight, hr[0], ref.lm_head.weight)
    assert flat.shape == (9,)


def test_bad_shapes_raise(models):
    cur, ref = models
    h = torch.randn(2, 5, 32)
    with pytest.raises(ValueError, match="token_mask must have shape"):
        FusedMaskedKLLoss()(h, cur.lm_head, h, ref.lm_head, token_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="same leading"):
        FusedMaskedKLLoss()(h, cur.lm_head, h[:, :4], ref.lm_head)
    with pytest.raises(ValueError, match=r"shift=True needs \[B, T, H\]"):
        FusedMaskedKLLoss()(h[0], cur.lm_head, h[0], ref.lm_head)
    with pytest.raises(TypeError, match="lm_head"):
        FusedMaskedKLLoss()(h, object(), h, ref.lm_head)
    with pytest.raises(ValueError, match="reduction"):
        FusedMaskedKLLoss(reduction="avg")
