"""MiniMMU: SIU against GA, GA+KL and PO on a real (small) multimodal model, on a CPU.

For each forgotten digit, the forget image is the first training image of that digit that the
original model names correctly (forgetting what the model never recognised would measure nothing),
and each method fine-tunes a copy of the model through :func:`unlearn_ext.siu.unlearn_concept`:

* ``siu``: the four-target data (fictitious name, counterfactual description, the digit's facts,
  other digits' facts, plus ``image_retain`` images per other digit with their normal answers);
* ``ga`` / ``ga_kl``: the forget image with the identity questions and the original answers naming
  the digit, gradient ascent (plus the KL to the original for GA+KL);
* ``po``: the same questions answered with a refusal.

Metrics (METHODS.md 2.5, :mod:`unlearn_ext.siu.metrics`), in %, except fluency (perplexity):

* efficacy = 100 * (1 - hit rate) of the identity questions on the forget image;
* generality = the same on held-out test images of the digit;
* specificity = digit accuracy on other digits' test images (``specificity_drop``: against the
  original); text_specificity = the share of the text-only :data:`TEXT_QUESTIONS` (counting, digit
  facts, general knowledge) that the original model answers correctly and the unlearned one still
  does (the expected word as a whole word; not SIU's type-4 questions), ``text_drop`` = 100 - it;
* fluency = perplexity on the original model's answers about the forget image, the digit's tokens
  excluded; diversity of the held-out answers; C-Dis on the original answers; Min-K% Prob (K = 40%)
  on the forget Q/A.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

from unlearn_ext.siu.api import CONCEPT_METHODS, ConceptRequest, unlearn_concept
from unlearn_ext.siu.data import SIUSample
from unlearn_ext.siu.masks import concept_token_ids, encode_sample
from unlearn_ext.siu.metrics import answer_accuracy, c_dis, concept_hit_rate, diversity, fluency_ppl, min_k_prob
from unlearn_ext.siu.minimmu import DIGIT_WORDS, IMAGE_QA, build_minimmu, greedy_answers
from unlearn_ext.siu.train import FinetuneConfig

__all__ = [
    "METRICS",
    "TEXT_QUESTIONS",
    "MMUSpec",
    "add_spec_arguments",
    "digit_request",
    "hf_llava_check",
    "merge_reports",
    "run_minimmu",
    "spec_from_args",
    "summarise_rows",
]

FICTITIOUS = "Zorblat"
COUNTERFACTUAL = "The picture shows a round closed loop with a small tail, like the letter q."
REFUSAL = "I cannot tell which digit this is."
#: Report columns, in order (``*_drop``: points lost against the original model).
METRICS = (
    "efficacy",
    "generality",
    "specificity",
    "specificity_drop",
    "text_specificity",
    "text_drop",
    "fluency_ppl",
    "diversity",
    "c_dis",
    "min_k",
)


@dataclass(kw_only=True)
class MMUSpec:
    """One MiniMMU run: which digits to forget (one at a time), which methods, their fine-tuning."""

    digits: tuple[int, ...] = (7, 3, 0)
    methods: tuple[str, ...] = CONCEPT_METHODS
    steps: int = 48
    lr: float = 5e-4
    batch_size: int = 6
    lora_rank: int | None = 16  # LoRA on the attention projections; None: full fine-tuning
    train: str = "all"  # which parameters: "all", or a substring of their names ("decoder": the LM only)
    alpha: float = 0.9
    beta: float = 0.75
    held_out: int = 20
    others: int = 10
    image_retain: int = 5
    #: Training seeds (batch order): each method runs once per seed; a few steps on one image vary
    #: enough with the order (a 7-point spread of SIU's specificity drop on digit 3) that one seed
    #: cannot judge a 5-point target.
    seeds: tuple[int, ...] = (0, 1, 2)
    hparams: dict = field(default_factory=dict)  # per method: FinetuneConfig overrides

    def __post_init__(self) -> None:
        self.digits, self.methods, self.seeds = tuple(self.digits), tuple(self.methods), tuple(self.seeds)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be one or more distinct integers, got {list(self.seeds)}")
        if not self.digits or any(not 0 <= d <= 9 for d in self.digits):
            raise ValueError(f"digits must be one or more of 0-9, got {list(self.digits)}")
        bad = [m for m in self.methods if m not in CONCEPT_METHODS]
        if bad or not self.methods:
            raise ValueError(f"unknown MiniMMU method(s) {bad}; available: {', '.join(CONCEPT_METHODS)}")
        if self.held_out < 1 or self.others < 1 or self.image_retain < 0:
            raise ValueError("held_out and others must be >= 1 and image_retain >= 0")


def add_spec_arguments(parser) -> None:
    """Add the :class:`MMUSpec` options (``--digits``, ``--steps``, ...; defaults from the class) to
    an argparse ``parser``: ``unlearn mmu`` and ``benchmarks/bench_siu.py`` share them."""
    d = MMUSpec()
    a = parser.add_argument
    a("--digits", type=int, nargs="+", default=list(d.digits), metavar="D", help="digits, one at a time")
    a("--methods", nargs="+", default=list(d.methods), choices=CONCEPT_METHODS, metavar="M",
      help=f"methods (default all: {', '.join(CONCEPT_METHODS)})")  # fmt: skip
    a("--steps", type=int, default=d.steps, help=f"fine-tuning steps (default {d.steps})")
    a("--lr", type=float, default=d.lr, help=f"Adam learning rate (default {d.lr:g})")
    a("--batch-size", type=int, default=d.batch_size, help=f"samples per step (default {d.batch_size})")
    a("--lora-rank", type=int, default=d.lora_rank, help=f"LoRA rank (default {d.lora_rank}; 0: full fine-tuning)")
    a("--train", default=d.train, help="parameters to train: all, or a substring of their names (decoder: the LM only)")
    a("--alpha", type=float, default=d.alpha, help=f"SIU's CE weight (default {d.alpha})")
    a("--beta", type=float, default=d.beta, help=f"SIU's masked-KL weight (default {d.beta})")
    a("--image-retain", type=int, default=d.image_retain,
      help=f"training images per other digit in SIU's type-4 data (default {d.image_retain})")  # fmt: skip
    a("--held-out", type=int, default=d.held_out,
      help=f"test images of the digit for generality (default {d.held_out})")  # fmt: skip
    a("--others", type=int, default=d.others,
      help=f"test images per other digit for specificity (default {d.others})")  # fmt: skip
    a("--seeds", type=int, nargs="+", default=list(d.seeds), metavar="S",
      help=f"training seeds, each method once per seed (default {' '.join(map(str, d.seeds))})")  # fmt: skip


def spec_from_args(args) -> MMUSpec:
    """The :class:`MMUSpec` of options added by :func:`add_spec_arguments` (ValueError if invalid)."""
    return MMUSpec(
        digits=tuple(args.digits), methods=tuple(args.methods), steps=args.steps, lr=args.lr,
        batch_size=args.batch_size, lora_rank=args.lora_rank or None, train=args.train, alpha=args.alpha,
        beta=args.beta, image_retain=args.image_retain, held_out=args.held_out, others=args.others,
        seeds=tuple(args.seeds),
    )  # fmt: skip


#: Text-only questions with the expected word(s) (whole words; any alternative counts). Not SIU's
#: type-4 training questions (parity), so text specificity is not measured on training data. Some
#: have a digit as the answer: knowing that a week has seven days is knowledge SIU must keep (its
#: target 3) while it forgets what a seven looks like.
TEXT_QUESTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("How many legs does a spider have?", ("eight", "8")),
    ("How many sides does a triangle have?", ("three", "3")),
    ("How many days are there in a week?", ("seven", "7")),
    ("How many fingers are there on one hand?", ("five", "5")),
    ("What is two plus two?", ("four", "4")),
    ("How many wheels does a bicycle have?", ("two", "2")),
    ("How many legs does a dog have?", ("four", "4")),
    ("What is ten minus one?", ("nine", "9")),
    ("How many months are there in a year?", ("twelve", "12")),
    ("What number comes after zero?", ("one", "1")),
    ("What is the capital of France?", ("paris",)),
    ("What color is the sky on a clear day?", ("blue",)),
    ("What is the opposite of hot?", ("cold",)),
    ("What do bees make?", ("honey",)),
    ("What is frozen water called?", ("ice",)),
    ("What planet do we live on?", ("earth",)),
    ("How many hours are there in a day?", ("twenty-four", "24")),
    ("How many minutes are there in an hour?", ("sixty", "60")),
    ("What is the capital of Italy?", ("rome",)),
    ("What is the capital of Japan?", ("tokyo",)),
    ("What color is grass?", ("green",)),
    ("How many eyes does a person have?", ("two", "2")),
    ("How many seasons are there in a year?", ("four", "4")),
    ("How many continents are there?", ("seven", "7")),
    # Added with the 90-image specificity set: 27 more that the original MiniMMU model answers (the
    # list keeps only questions it answers; 10 questions made one lost answer worth 10 points).
    ("What is the capital of Germany?", ("berlin",)),
    ("What is the capital of England?", ("london",)),
    ("What is the capital of Russia?", ("moscow",)),
    ("What is the capital of China?", ("beijing",)),
    ("What is the capital of Egypt?", ("cairo",)),
    ("What is the largest ocean on Earth?", ("pacific",)),
    ("What is the opposite of up?", ("down",)),
    ("What is the opposite of big?", ("small", "little")),
    ("What is the opposite of day?", ("night",)),
    ("What is the opposite of wet?", ("dry",)),
    ("What is the opposite of fast?", ("slow",)),
    ("What gas do humans need to breathe?", ("oxygen",)),
    ("What star is at the centre of our solar system?", ("sun",)),
    ("How many legs does a cat have?", ("four", "4")),
    ("How many days are there in a year?", ("365",)),
    ("Who wrote Romeo and Juliet?", ("shakespeare",)),
    ("At what temperature in Celsius does water boil?", ("100", "hundred")),
    ("What language is spoken in France?", ("french",)),
    ("How many letters are in the English alphabet?", ("26", "twenty-six")),
    ("What is the first month of the year?", ("january",)),
    ("What is the last month of the year?", ("december",)),
    ("How many sides does a hexagon have?", ("six", "6")),
    ("How many sides does a pentagon have?", ("five", "5")),
    ("How many sides does an octagon have?", ("eight", "8")),
    ("How many sides does a heptagon have?", ("seven", "7")),
    ("What do cows produce?", ("milk",)),
    ("What is the largest mammal?", ("whale",)),
)


def _text_questions(model, tok) -> list[tuple[str, tuple[str, ...]]]:
    """The :data:`TEXT_QUESTIONS` that the original ``model`` answers correctly: text specificity is
    the share of them still answered correctly (100 for the original by construction)."""
    from unlearn_ext.siu.metrics import _names

    answers = greedy_answers(model, tok, [q for q, _ in TEXT_QUESTIONS], [None] * len(TEXT_QUESTIONS))
    return [(q, e) for (q, e), a in zip(TEXT_QUESTIONS, answers, strict=True) if any(_names(a, w) for w in e)]


def digit_request(digit: int, image, retain_images=()) -> ConceptRequest:
    """The :class:`ConceptRequest` for forgetting ``digit`` shown in ``image`` ``[1, 28, 28]``;
    ``retain_images``: ``(image, label)`` pairs of other digits (SIU's image type-4 data)."""
    word = DIGIT_WORDS[digit]
    parity = "an odd" if digit % 2 else "an even"
    return ConceptRequest(
        concept=word,
        image=image,
        kind="digit",
        fictitious_name=FICTITIOUS,
        counterfactual_description=COUNTERFACTUAL,
        facts=[f"Yes, {word} is {parity} number."],
        other_concepts={
            f"Is {w} an odd or an even number?": f"{w.capitalize()} is {'odd' if i % 2 else 'even'}."
            for i, w in enumerate(DIGIT_WORDS)
            if i != digit
        },
        identity_prompts=[q for q, _ in IMAGE_QA] + ["Which digit is in the picture?"],
        identity_answer=[a.replace("{word}", "{concept}") for _, a in IMAGE_QA] + ["This is the digit {concept}."],
        refusal=REFUSAL,
        retain_images=[(x, IMAGE_QA[0][0], IMAGE_QA[0][1].format(word=DIGIT_WORDS[y])) for x, y in retain_images],
    )


def _identity_answer(answer_template: str, digit: int) -> str:
    return answer_template.format(word=DIGIT_WORDS[digit])


class _Context:
    """Everything the metrics of one digit need, computed once from the original model."""

    def __init__(self, model, tok, ds, digit: int, image, spec: MMUSpec) -> None:
        self.model, self.tok, self.digit, self.image = model, tok, digit, image
        self.word = DIGIT_WORDS[digit]
        test_idx = (ds.y_test == digit).nonzero().flatten()[: spec.held_out]
        self.held_out = [ds.x_test[i] for i in test_idx]
        self.others = [
            (ds.x_test[i], int(ds.y_test[i]))
            for d in range(10)
            if d != digit
            for i in (ds.y_test == d).nonzero().flatten()[: spec.others]
        ]
        self.probe = [q for q, _ in IMAGE_QA]
        self.text = _text_questions(model, tok)
        self.orig_probe = greedy_answers(model, tok, self.probe, [image] * len(self.probe))
        enc = {"image_token_id": model.image_token_id, "num_image_tokens": model.num_image_tokens}
        self.ref_samples = [
            encode_sample(SIUSample(0, q, a or "-", True, None), tok, **enc)
            for q, a in zip(self.probe, self.orig_probe, strict=True)
        ]
        self.forget_qa = [
            encode_sample(SIUSample(0, q, _identity_answer(a, digit), True, None), tok, **enc) for q, a in IMAGE_QA
        ]
        self.concept_ids = concept_token_ids(tok, self.word)

    def evaluate(self, model) -> dict:
        tok, pad, image = self.tok, self.tok.pad_token_id, self.image
        hit, _ = concept_hit_rate(model, tok, self.probe, [image] * len(self.probe), self.word)
        question = IMAGE_QA[0][0]
        gen_hit, gen_answers = concept_hit_rate(model, tok, [question] * len(self.held_out), self.held_out, self.word)
        spec, _ = answer_accuracy(
            model, tok, [question] * len(self.others), [x for x, _ in self.others],
            [DIGIT_WORDS[y] for _, y in self.others],
        )  # fmt: skip
        questions, expected = [q for q, _ in self.text], [e for _, e in self.text]
        n = len(self.forget_qa)
        text = {}  # undefined (left out) when the original model answers none of the text questions
        if questions:
            text["text_specificity"] = (
                100 * answer_accuracy(model, tok, questions, [None] * len(questions), expected)[0]
            )
        return {
            "efficacy": 100 * (1 - hit),
            "generality": 100 * (1 - gen_hit),
            "specificity": 100 * spec,
            **text,
            "text_questions": len(questions),
            "fluency_ppl": fluency_ppl(model, self.ref_samples, [image] * len(self.ref_samples), self.concept_ids, pad),
            "diversity": diversity(gen_answers),
            "c_dis": c_dis(model, self.model, self.forget_qa, [image] * n, self.concept_ids, pad),
            "min_k": statistics.fmean(min_k_prob(model, self.forget_qa, [image] * n, pad)),
        }


def _forget_image(model, tok, ds, digit: int):
    candidates = (ds.y_train == digit).nonzero().flatten()[:50].tolist()
    answers = greedy_answers(model, tok, [IMAGE_QA[0][0]] * len(candidates), [ds.x_train[i] for i in candidates])
    for i, answer in zip(candidates, answers, strict=True):
        if DIGIT_WORDS[digit] in answer.lower():
            return i
    raise ValueError(f"the original MiniMMU model names none of the first 50 training images of digit {digit}")


def run_minimmu(spec: MMUSpec, *, built=None, progress: bool = False, log=print) -> dict:
    """Run ``spec`` on MiniMMU (built and cached on first use; ``built``: a ``build_minimmu()``
    result to reuse); returns the report: per digit and method the metrics, and their means."""
    t_start = time.perf_counter()
    model, tok, ds, info = built if built is not None else build_minimmu(progress=progress)
    rows: list[dict] = []
    for digit in spec.digits:
        idx = _forget_image(model, tok, ds, digit)
        image = ds.x_train[idx]
        ctx = _Context(model, tok, ds, digit, image, spec)
        base = ctx.evaluate(model)
        rows.append({"digit": digit, "method": "original", "forget_index": idx, **base, "seconds": 0.0})
        log(f"digit {digit} original: {_fmt(base)}")
        retain = [
            (ds.x_train[i], d)
            for d in range(10)
            if d != digit
            for i in (ds.y_train == d).nonzero().flatten()[: spec.image_retain].tolist()
        ]
        request = digit_request(digit, image, retain)
        for method in spec.methods:
            for seed in spec.seeds:
                cfg = FinetuneConfig(
                    objective=method, steps=spec.steps, lr=spec.lr, batch_size=spec.batch_size,
                    lora_rank=spec.lora_rank, train=spec.train, alpha=spec.alpha, beta=spec.beta, seed=seed,
                    **spec.hparams.get(method, {}),
                )  # fmt: skip
                res = unlearn_concept(
                    model, tok, request, method=method, image_token_id=model.image_token_id,
                    num_image_tokens=model.num_image_tokens, config=cfg, progress=progress,
                )  # fmt: skip
                m = ctx.evaluate(res.model)
                m["specificity_drop"] = base["specificity"] - m["specificity"]
                if "text_specificity" in base:
                    m["text_drop"] = base["text_specificity"] - m["text_specificity"]
                m["seconds"], m["final_loss"] = res.seconds, res.log[-1]["loss"]
                rows.append({"digit": digit, "method": method, "seed": seed, **m})
                log(f"digit {digit} {method} seed {seed}: {_fmt(m)} ({res.seconds:.1f} s)")
    return {
        "benchmark": "minimmu",
        "spec": asdict(spec),
        "minimmu": info,
        "rows": rows,
        **summarise_rows(rows, ["original", *spec.methods]),
        "wall_seconds": time.perf_counter() - t_start,
    }


def summarise_rows(rows: list[dict], methods: list[str]) -> dict:
    """``summary``: per method, each metric's mean over all its rows (digits x seeds); ``by_digit``:
    per method and digit, the mean over seeds, ``<metric>_sd`` the sample standard deviation (with
    two or more seeds) and ``runs`` the number of rows."""
    summary, by_digit = {}, {}
    for method in methods:
        sel = [r for r in rows if r["method"] == method]
        if not sel:
            raise ValueError(f"no rows for method {method!r}")
        keys = [k for k in [*METRICS, "seconds"] if k in sel[0]]
        summary[method] = {k: statistics.fmean(r[k] for r in sel) for k in keys}
        by_digit[method] = {}
        for digit in sorted({r["digit"] for r in sel}):
            group = [r for r in sel if r["digit"] == digit]
            entry: dict = {"runs": len(group)}
            for k in keys:
                vals = [r[k] for r in group]
                entry[k] = statistics.fmean(vals)
                if len(vals) > 1:
                    entry[f"{k}_sd"] = statistics.stdev(vals)
            by_digit[method][str(digit)] = entry
    return {"summary": summary, "by_digit": by_digit}


def merge_reports(reports: list[dict]) -> dict:
    """One report from :func:`run_minimmu` reports of one protocol run side by side (other digits,
    methods or seeds): rows concatenated (the original model's row once per digit), ``summary`` and
    ``by_digit`` recomputed, the spec's digits, methods and seeds the union, ``wall_seconds`` the
    longest run's. ValueError when the settings differ or a run appears twice."""
    if not reports:
        raise ValueError("merge_reports needs at least one report")
    varying = ("digits", "methods", "seeds")
    base = {k: v for k, v in reports[0]["spec"].items() if k not in varying}
    rows: list[dict] = []
    seen: set[tuple] = set()
    for i, rep in enumerate(reports):
        if "seeds" not in rep.get("spec", {}):
            raise ValueError(f"report {i} has no spec.seeds (written before runs had seeds): not mergeable")
        other = {k: v for k, v in rep["spec"].items() if k not in varying}
        if other != base:
            diff = sorted(k for k in base.keys() | other.keys() if base.get(k) != other.get(k))
            raise ValueError(f"report {i} was run with other settings ({', '.join(diff)}): not one protocol")
        for r in rep["rows"]:
            key = (r["digit"], r["method"], r.get("seed"))
            if key in seen:
                if r["method"] == "original":
                    continue
                raise ValueError(f"digit {r['digit']} {r['method']} seed {r.get('seed')} is in two reports")
            seen.add(key)
            rows.append(r)
    methods = list(dict.fromkeys(m for rep in reports for m in rep["spec"]["methods"]))
    order = {m: i for i, m in enumerate(["original", *methods])}
    rows.sort(key=lambda r: (r["digit"], order[r["method"]], r.get("seed", 0)))
    spec = {
        **reports[0]["spec"],
        "digits": sorted({d for rep in reports for d in rep["spec"]["digits"]}),
        "methods": methods,
        "seeds": sorted({s for rep in reports for s in rep["spec"]["seeds"]}),
    }
    return {
        **reports[0],
        "spec": spec,
        "rows": rows,
        **summarise_rows(rows, ["original", *methods]),
        "wall_seconds": max(rep["wall_seconds"] for rep in reports),
        "merged_from": len(reports),
    }


def _fmt(m: dict) -> str:
    return ", ".join(f"{k} {m[k]:.3g}" for k in METRICS if k in m)


def hf_llava_check(tokenizer, image, *, steps: int = 6, lr: float = 5e-3, seed: int = 0) -> dict:
    """The Hugging Face integration path: every method through :func:`unlearn_concept` on a tiny,
    random-initialised ``transformers.LlavaForConditionalGeneration`` (CLIP vision tower, Llama text
    model, ``tokenizer``'s vocabulary plus one image token), forgetting "seven" shown in ``image``
    ``[1, 28, 28]``.

    Returns per method: seconds, and the mean answer cross-entropy (nats/token, full logits, the
    plain way) on the method's own target answers before and after; SIU and PO must lower it, GA
    and GA+KL raise it on the answer naming the concept.
    """
    import torch
    import torch.nn.functional as F
    import transformers

    from unlearn_ext.siu.api import concept_training_data
    from unlearn_ext.siu.train import collate

    image_id = len(tokenizer)  # one id past the tokenizer's vocabulary: the image placeholder
    patch, side = 7, image.shape[-1]
    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=side,
            patch_size=patch, num_channels=image.shape[0],
        ),
        text_config=transformers.LlamaConfig(
            vocab_size=image_id + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        ),
        image_token_index=image_id, vision_feature_select_strategy="default", vision_feature_layer=-1,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    enc = {"image_token_id": image_id, "num_image_tokens": (side // patch) ** 2}
    request = digit_request(7, image)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def answer_ce(m, samples, images) -> float:
        batch = collate(samples, pad)
        imgs = [i for i in images if i is not None]
        with torch.no_grad():
            logits = m(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                pixel_values=torch.stack(imgs) if imgs else None,
            ).logits  # fmt: skip
        return float(F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100))

    out = {}
    for method in CONCEPT_METHODS:
        samples, images = concept_training_data(method, request, tokenizer, **enc)
        # The identity answers, which every method's data starts with: SIU's and PO's targets (the
        # fictitious name, the refusal), and the answers naming the concept that GA ascends on.
        keep = range(len(request.identity_prompts))
        before = answer_ce(model, [samples[i] for i in keep], [images[i] for i in keep])
        res = unlearn_concept(
            model, tokenizer, request, method=method, **enc,
            config=FinetuneConfig(steps=steps, lr=lr, batch_size=4, seed=seed),
        )  # fmt: skip
        after = answer_ce(res.model, [samples[i] for i in keep], [images[i] for i in keep])
        out[method] = {"seconds": res.seconds, "answer_ce_before": before, "answer_ce_after": after}
    return out
