"""Bad input to every public model entry point ends in a clear ValueError/TypeError - never an error
from deep inside torch, never a silent NaN.

Each case is one argument of one entry point, with a valid value for it; the other arguments stay
valid. The bad values are mutations of the valid one (dtype, NaN/inf, empty axis, extra or missing
axis, numpy/list, negative, huge, 0/1 masks made 2s) plus wrong Python types (None, str, bool...).
A mutation may happen to be valid (an int32 id tensor): then the call must succeed and any float
tensor it returns must be finite. A fixed sweep counts cases tried / clear errors / other errors and
asserts 0 "other"; hypothesis then draws random combinations on top.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minivl import clip, generation
from minivl.clip import CLIP, CLIPConfig, clip_loss
from minivl.lm import CausalLM, LMConfig
from minivl.text import TextConfig, TextEncoder
from minivl.tokenizer import Tokenizer
from minivl.vit import VisionTransformer, ViTClassifier, ViTConfig

torch.manual_seed(0)
TOK = Tokenizer.train(["a red circle", "a large blue square", "a green triangle"] * 3, vocab_size=280)
VIT = VisionTransformer(ViTConfig.preset("tiny")).eval()
CLF = ViTClassifier(ViTConfig.preset("tiny", num_classes=3)).eval()
TEXT = TextEncoder(TextConfig.preset("tiny")).eval()
LM = CausalLM(LMConfig.preset("tiny", pad_id=0, eos_id=1, bos_id=2)).eval()
CLIPM = CLIP(CLIPConfig.preset("tiny", pad_id=TOK.pad_id)).eval()
CLIPM.tokenizer = TOK
PRE = clip.Preprocess(32)

IMG = torch.rand(2, 3, 32, 32) * 2 - 1
IDS = torch.randint(3, 250, (2, 5))
MASK = torch.ones(2, 5, dtype=torch.long)
CIDS = TOK(["a red circle", "a square"], context_length=16)
FEAT = torch.randn(2, 8)
NEW = torch.randint(3, 250, (2, 3))
ZSC = clip.ZeroShotClassifier(CLIPM, ["red circle", "blue square"], templates=["a {}"], tokenizer=TOK)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest)


def _generate_with(arg):
    return lambda v: LM.generate(IDS, **{"max_new_tokens": 3, arg: v})


def _config(cls, field):
    return lambda v: cls.preset("tiny", **{field: v})


# (name, call(v), valid value, words of which the error message must contain one)
CASES = [
    ("vit.forward", lambda v: VIT(v).tokens, IMG, ("images",)),
    ("vit.attention_maps", lambda v: VIT.attention_maps(v), IMG, ("images",)),
    ("clf.forward", lambda v: CLF(v), IMG, ("images",)),
    ("clf.loss.image", lambda v: CLF.loss({"image": v, "label": torch.tensor([0, 1])})[0], IMG, ("images", "label")),
    ("clf.loss.label", lambda v: CLF.loss({"image": IMG, "label": v})[0], torch.tensor([0, 1]), ("label",)),
    ("text.ids", lambda v: TEXT(v).pooled, IDS, ("input_ids", "context length")),
    ("text.mask", lambda v: TEXT(IDS, v).pooled, MASK, ("attention_mask",)),
    ("lm.ids", lambda v: LM(v), IDS, ("input_ids", "context length")),
    ("lm.mask", lambda v: LM(IDS, v), MASK, ("attention_mask",)),
    ("lm.inputs_embeds", lambda v: LM(inputs_embeds=v), torch.randn(2, 3, 32), ("inputs_embeds", "context length")),
    ("lm.position_ids", lambda v: LM(IDS, position_ids=v), torch.arange(5).expand(2, 5), ("position_ids",)),
    ("lm.loss.ids", lambda v: LM.loss({"input_ids": v})[0], IDS, ("input_ids", "context length", "loss")),
    ("lm.loss.labels", lambda v: LM.loss({"input_ids": IDS, "labels": v})[0], IDS, ("labels", "loss")),
    ("lm.generate.ids", lambda v: LM.generate(v, max_new_tokens=3), IDS, ("input_ids", "context length", "prompt")),
    ("lm.generate.mask", lambda v: LM.generate(IDS, v, max_new_tokens=3), MASK, ("attention_mask", "prompt")),
    ("generate.embeds", lambda v: generation.generate(LM, inputs_embeds=v, max_new_tokens=2), torch.randn(2, 3, 32),
     ("inputs_embeds", "context length")),
] + [
    (f"lm.generate.{k}", _generate_with(k), v0, (k,))
    for k, v0 in [("max_new_tokens", 3), ("min_new_tokens", 0), ("temperature", 1.0), ("top_k", 2),
                  ("top_p", 0.9), ("repetition_penalty", 1.2), ("num_beams", 2), ("length_penalty", 1.0),
                  ("eos_id", 1), ("pad_id", 0), ("do_sample", False), ("use_cache", True)]
] + [
    ("lm.continuation.new", lambda v: LM.continuation_logprob(IDS, v)[0], NEW, ("new_tokens", "context length")),
    ("lm.continuation.ids", lambda v: LM.continuation_logprob(v, NEW)[0], IDS, ("input_ids", "context length", "batch")),
    ("top_k_filter.logits", lambda v: generation.top_k_filter(v, 2), torch.randn(2, 9), ("logits",)),
    ("top_k_filter.k", lambda v: generation.top_k_filter(torch.randn(2, 9), v), 2, ("top_k",)),
    ("top_p_filter.logits", lambda v: generation.top_p_filter(v, 0.9), torch.randn(2, 9), ("logits",)),
    ("top_p_filter.p", lambda v: generation.top_p_filter(torch.randn(2, 9), v), 0.9, ("top_p",)),
    ("clip.forward.image", lambda v: CLIPM(v, CIDS)[0], IMG, ("images",)),
    ("clip.forward.text", lambda v: CLIPM(IMG, v)[0], CIDS["input_ids"], ("input_ids", "text", "context length")),
    ("clip.encode_image", lambda v: CLIPM.encode_image(v), IMG, ("images",)),
    ("clip.encode_text", lambda v: CLIPM.encode_text(v), CIDS["input_ids"], ("input_ids", "text", "context length")),
    ("clip.encode_text.mask", lambda v: CLIPM.encode_text({"input_ids": CIDS["input_ids"], "attention_mask": v}),
     CIDS["attention_mask"], ("attention_mask",)),
    ("clip.loss.ids", lambda v: CLIPM.loss({"image": IMG, "input_ids": v})[0], CIDS["input_ids"],
     ("input_ids", "context length", "attention_mask")),
    ("clip.loss.batch", lambda v: CLIPM.loss(v)[0], {"image": IMG, **CIDS},
     ("batch", "CLIP.loss", "images", "input_ids", "attention_mask")),
    ("clip.tokenize.method", lambda v: CLIPM.tokenize(v), ["a red circle"], ("texts",)),
    ("clip.tokenize", lambda v: clip.tokenize(v, tokenizer=TOK), ["a red circle"], ("texts",)),
    ("clip.tokenize.context_length", lambda v: clip.tokenize(["a"], context_length=v, tokenizer=TOK), 8,
     ("context_length",)),
    ("preprocess", lambda v: PRE(v), torch.rand(3, 32, 32), ("image",)),
    ("preprocess.size", lambda v: clip.Preprocess(v), 32, ("image_size",)),
    ("clip_loss.image", lambda v: clip_loss(v, FEAT), FEAT, ("image_features", "same shape")),
    ("clip_loss.temperature", lambda v: clip_loss(FEAT, FEAT, temperature=v), 0.07, ("temperature",)),
    ("clip_loss.temperature_t", lambda v: clip_loss(FEAT, FEAT, temperature=v), torch.tensor(0.07), ("temperature",)),
    ("clip_loss.positives", lambda v: clip_loss(FEAT, FEAT, positives=v), torch.eye(2, dtype=torch.bool),
     ("positives",)),
    ("zsc.classnames", lambda v: clip.ZeroShotClassifier(CLIPM, v, templates=["a {}"], tokenizer=TOK),
     ["red circle"], ("classnames",)),
    ("zsc.templates", lambda v: clip.ZeroShotClassifier(CLIPM, ["red"], templates=v, tokenizer=TOK),
     ["a {}"], ("templates",)),
    ("zsc.call", lambda v: ZSC(v), IMG, ("images",)),
    ("zero_shot_logits.feat", lambda v: clip.zero_shot_logits(v, FEAT), FEAT, ("image_features",)),
    ("zero_shot_logits.scale", lambda v: clip.zero_shot_logits(FEAT, FEAT, v), 100.0, ("scale",)),
    ("zero_shot_predict.class", lambda v: clip.zero_shot_predict(FEAT, v), FEAT, ("class_embeddings",)),
    ("zero_shot_eval.labels", lambda v: clip.zero_shot_eval(FEAT, v, FEAT)["top1"], torch.tensor([0, 1]),
     ("labels",)),
    ("ensemble", lambda v: clip.ensemble_class_embeddings(v), torch.randn(2, 3, 8), ("text_features",)),
    ("encode_images", lambda v: clip.encode_images(CLIPM, v), IMG, ("images",)),
    ("encode_images.batch_size", lambda v: clip.encode_images(CLIPM, IMG, batch_size=v), 1, ("batch_size",)),
    ("encode_texts", lambda v: clip.encode_texts(CLIPM, v, TOK), ["a red circle"], ("texts",)),
    ("retrieval.feat", lambda v: clip.retrieval_eval(v, FEAT, torch.eye(2, dtype=torch.bool)), FEAT,
     ("image_features", "positives")),
    ("retrieval.positives", lambda v: clip.retrieval_eval(FEAT, FEAT, v), torch.eye(2, dtype=torch.bool),
     ("positives",)),
    ("linear_probe.feat", lambda v: clip.linear_probe(v, [0, 1], FEAT, [0, 1], max_iter=5)["test_acc"], FEAT,
     ("train_features", "train_labels")),
    ("linear_probe.labels", lambda v: clip.linear_probe(FEAT, v, FEAT, [0, 1], max_iter=5)["test_acc"],
     torch.tensor([0, 1]), ("train_labels",)),
    ("linear_probe.num_classes", lambda v: clip.linear_probe(FEAT, [0, 1], FEAT, [0, 1], num_classes=v,
                                                             max_iter=5)["test_acc"], 2, ("num_classes", "labels")),
    ("linear_probe.l2", lambda v: clip.linear_probe(FEAT, [0, 1], FEAT, [0, 1], l2=v, max_iter=5)["test_acc"],
     1e-3, ("l2",)),
    ("tokenizer.encode", lambda v: TOK.encode(v), "a red circle", ("text",)),
    ("tokenizer.decode", lambda v: TOK.decode(v), [1, 2, 3], ("ids", "id ")),
    ("tokenizer.call", lambda v: TOK(v), ["a red circle"], ("texts",)),
    ("tokenizer.call.context_length", lambda v: TOK(["a"], context_length=v), 8, ("context_length",)),
    ("tokenizer.call.truncate", lambda v: TOK(["a"], truncate=v), False, ("truncate",)),
] + [
    (f"{cls.__name__}.{f}", _config(cls, f), getattr(cls.preset("tiny"), f), (f, "divisible", "multiple"))
    for cls, fields in [
        (ViTConfig, ["image_size", "patch_size", "width", "depth", "heads", "mlp_ratio", "dropout", "norm_eps",
                     "activation", "num_classes", "image_mean"]),
        (TextConfig, ["vocab_size", "context_length", "width", "depth", "heads", "mlp_ratio", "dropout", "activation"]),
        (LMConfig, ["vocab_size", "context_length", "width", "heads", "depth", "pad_id", "eos_id", "memory_dim",
                    "cross_attention"]),
        (CLIPConfig, ["embed_dim", "logit_scale_init", "logit_scale_max", "pad_id"]),
    ] for f in fields
]

SCALARS = [None, "3", "", True, False, -1, 0, 1.5, -2.5, 10**4, float("nan"), float("inf"), -float("inf"),
           1 + 1j, [], {}, object(), np.float64("nan"), torch.tensor(float("nan")), [1, 2]]


def _tensor_mutations(v: torch.Tensor) -> list:
    out = [v.to(d) for d in (torch.bool, torch.float64, torch.float16, torch.complex64, torch.int32, torch.uint8)]
    if v.is_floating_point():
        out += [v.masked_fill(torch.rand(v.shape) < 0.5, float("nan")), v + float("inf"), v * 1e4]
    else:
        w = v.long()
        out += [-w - 1, w + 10**4, w * 2 + 2, v.float()]
    out += [v.narrow(k, 0, 0) for k in range(v.dim())]  # an empty axis: B = 0, T = 0, ...
    out += [v[None], v.reshape(-1), v.numpy(), v.tolist()]
    if v.dim():
        out += [v[:1], v[0], v.repeat(*([2] + [1] * (v.dim() - 1)))]
    return out


def mutations(v0) -> list:
    if isinstance(v0, torch.Tensor):
        return _tensor_mutations(v0)
    if isinstance(v0, dict):
        return [{k: m for k, m in v0.items() if k != key} for key in v0] + [
            {**v0, key: m} for key in v0 for m in _tensor_mutations(v0[key])[:6]] + SCALARS
    return SCALARS + ([[None], [1], ["a", 2], ("a {}",), ["no slot"]] if isinstance(v0, list) else [])


def outcome(case, v) -> str:
    """'ok', 'clear' or 'other: ...' for one call."""
    name, call, _, words = case
    try:
        out = call(v)
    except (ValueError, TypeError) as e:
        msg = str(e)
        if len(msg) < 20 or not any(w.lower() in msg.lower() for w in words):
            return f"other: unclear {type(e).__name__}: {msg!r}"
        if "Traceback" in msg or " site-packages" in msg:
            return f"other: torch's message {msg!r}"
        return "clear"
    except Exception as e:  # noqa: BLE001 (the whole point: anything else is a fault)
        return f"other: {type(e).__name__}: {e}"
    for t in (out if isinstance(out, tuple) else (out,)):
        floats = isinstance(t, torch.Tensor) and t.is_floating_point() and not name.startswith("top_")
        if floats and not torch.isfinite(t).all():  # top-k/p filters write -inf on purpose
            return "other: silent non-finite output"
        if isinstance(t, float) and not math.isfinite(t):
            return "other: silent non-finite output"
    return "ok"


def test_valid_values_are_valid():
    for case in CASES:
        try:
            case[1](case[2])
        except Exception as e:
            raise AssertionError(f"{case[0]}: valid input raised {e!r}") from e
        assert outcome(case, case[2]) == "ok", case[0]


def test_sweep_every_entry_point_gives_only_clear_errors(capsys):
    tried, counts, others = 0, {"ok": 0, "clear": 0}, []
    for case in CASES:
        for v in mutations(case[2]):
            tried += 1
            r = outcome(case, v)
            if r.startswith("other"):
                others.append(f"{case[0]} <- {type(v).__name__} {getattr(v, 'dtype', '')} "
                              f"{tuple(getattr(v, 'shape', ()))}: {r}")
            else:
                counts[r] += 1
    with capsys.disabled():
        print(f"\nfuzz sweep: {len(CASES)} entry points, {tried} cases tried, {counts['clear']} clear errors, "
              f"{counts['ok']} accepted (valid), {len(others)} other")
    assert not others, "\n".join(others[:80])


@st.composite
def case_and_value(draw):
    case = draw(st.sampled_from(CASES))
    v0 = case[2]
    if isinstance(v0, torch.Tensor) and draw(st.booleans()):  # a random tensor of the same rank or so
        shape = draw(st.lists(st.integers(0, 4), min_size=max(v0.dim() - 1, 0), max_size=v0.dim() + 1))
        dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64, torch.bool]))
        scale = draw(st.sampled_from([1, -1, 1000, float("nan")]))
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))))
        v = (noise * scale).to(dtype) if dtype.is_floating_point else (noise * 400).to(dtype)
        return case, v
    return case, draw(st.sampled_from(mutations(v0)))


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(case_and_value())
def test_hypothesis_bad_inputs_give_only_clear_errors(cv):
    case, v = cv
    r = outcome(case, v)
    assert not r.startswith("other"), f"{case[0]}: {r}"


# ---------------------------------------------------------------------------- no silent wrong answer
def _raises(call, error=(ValueError, TypeError), match=None):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("name, call, error, match", [
    ("mask values 2 double LM positions", lambda: LM(IDS, MASK * 2), ValueError, "0 and 1"),
    ("batch-1 mask against batch-2 ids", lambda: TEXT(IDS, MASK[:1]), ValueError, "attention_mask"),
    ("left-padded CLIP mask", lambda: CLIPM.encode_text({"input_ids": IDS, "attention_mask": torch.tensor([[0, 0, 1, 1, 1]] * 2)}),
     ValueError, "right-padded"),
    ("tensor temperature 0", lambda: clip_loss(FEAT, FEAT, temperature=torch.tensor(0.0)), ValueError, "temperature"),
    ("tensor temperature nan", lambda: clip_loss(FEAT, FEAT, temperature=torch.tensor(float("nan"))), ValueError,
     "temperature"),
    ("negative logit scale", lambda: clip.zero_shot_logits(FEAT, FEAT, -1.0), ValueError, "scale"),
    ("nan logit scale", lambda: clip.zero_shot_logits(FEAT, FEAT, float("nan")), ValueError, "scale"),
    ("empty templates", lambda: clip.ZeroShotClassifier(CLIPM, ["red"], templates=[], tokenizer=TOK), ValueError,
     "templates"),
    ("K = 0 ensemble", lambda: clip.ensemble_class_embeddings(torch.randn(2, 0, 8)), ValueError, "empty"),
    ("greedy repetition_penalty nan", lambda: LM.generate(IDS, max_new_tokens=2, repetition_penalty=float("nan")),
     ValueError, "repetition_penalty"),
    ("greedy temperature nan", lambda: LM.generate(IDS, max_new_tokens=2, temperature=float("nan")), ValueError,
     "temperature"),
    ("greedy top_p 1.5", lambda: LM.generate(IDS, max_new_tokens=2, top_p=1.5), ValueError, "top_p"),
    ("beam top_k 0", lambda: LM.generate(IDS, max_new_tokens=2, num_beams=2, top_k=0), ValueError, "top_k"),
    ("max_new_tokens True", lambda: LM.generate(IDS, max_new_tokens=True), TypeError, "max_new_tokens"),
    ("NaN image in Preprocess", lambda: PRE(torch.full((3, 32, 32), float("nan"))), ValueError, "finite"),
    ("bool token ids", lambda: TEXT(IDS.bool()), TypeError, "integer"),
    ("empty batch", lambda: VIT(IMG[:0]), ValueError, "empty"),
    ("empty sequence", lambda: LM(IDS[:, :0]), ValueError, "empty"),
    ("pad id outside the vocabulary", lambda: LM.generate(IDS, max_new_tokens=2, pad_id=300), ValueError, "pad_id"),
    ("LMConfig eos outside the vocabulary", lambda: LMConfig.preset("tiny", eos_id=300), ValueError, "eos_id"),
    ("width not divisible by heads", lambda: ViTConfig.preset("tiny", heads=3), ValueError, "divisible"),
    ("negative depth", lambda: TextConfig.preset("tiny", depth=-1), ValueError, "depth"),
    ("vocab_size 0", lambda: LMConfig.preset("tiny", vocab_size=0), ValueError, "vocab_size"),
    ("str width", lambda: CLIPConfig.preset("tiny", embed_dim="32"), TypeError, "embed_dim"),
])
def test_no_silent_wrong_answer(name, call, error, match):
    _raises(call, error, match)


def test_clip_text_without_mask_pools_the_end_token_not_a_pad():
    """The mask comes from config.pad_id: the same embedding as with the tokenizer's mask."""
    with torch.no_grad():
        with_mask = CLIPM.encode_text(CIDS)
        without = CLIPM.encode_text({"input_ids": CIDS["input_ids"]})
        bare = CLIPM.encode_text(CIDS["input_ids"])
    torch.testing.assert_close(without, with_mask)
    torch.testing.assert_close(bare, with_mask)
    no_pad = CLIP(CLIPConfig.preset("tiny", pad_id=None))
    with pytest.raises(ValueError, match="pad_id"):
        no_pad.encode_text({"input_ids": CIDS["input_ids"]})


def test_float64_and_float16_images_are_cast_to_the_model_dtype():
    with torch.no_grad():
        ref = VIT(IMG).pooled
        torch.testing.assert_close(VIT(IMG.double()).pooled, ref)
        assert torch.isfinite(VIT(IMG.half()).pooled).all()


def test_value_checks_never_read_accelerator_memory():
    """On an accelerator a value check is a host sync per forward pass: only shapes and dtypes are
    checked there. A meta tensor has no values at all, so reading one would raise."""
    from minivl import validate
    from minivl.vit import check_images
    images = torch.zeros(2, 3, 32, 32, device="meta")
    validate.tensor("images", images, shape=("B", 3, 32, 32), finite=True, low=-1, high=1)
    check_images(images, 32)
    ids = torch.zeros(2, 5, dtype=torch.long, device="meta")
    validate.token_ids("input_ids", ids, 300)
    validate.attention_mask("attention_mask", ids, (2, 5), right_padded=True)
    with pytest.raises(TypeError, match="integer"):  # dtypes are still checked, for free
        validate.token_ids("input_ids", ids.float(), 300)
    with pytest.raises(ValueError, match=r"must match the ids' shape"):  # and shapes
        validate.attention_mask("attention_mask", ids[:1], (2, 5))


def test_validate_scalars_reject_bools_nan_and_wrong_types():
    from minivl import validate
    with pytest.raises(TypeError, match="n must be an int"):
        validate.positive_int("n", True)
    with pytest.raises(ValueError, match="n must be an int >= 1, got 0"):
        validate.positive_int("n", 0)
    with pytest.raises(ValueError, match="x must be finite"):
        validate.real("x", float("nan"), 0)
    with pytest.raises(TypeError, match="x must be a real number"):
        validate.real("x", "1.0")
    with pytest.raises(ValueError, match="x must be > 0"):
        validate.real("x", 0.0, 0, low_open=True)
    assert validate.real("x", torch.tensor(0.5), 0, 1) == 0.5
