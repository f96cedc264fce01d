"""Checks a student calls after an exercise: `minivl.checks.attention(my_attention)`.

Each check runs the student's function on seeded random inputs and compares it with the
package's own implementation (or an independent formula): the output's shape, its values by
relative error as CS231n measures it, max |a - b| / max(|a| + |b|), in float64, and where it
matters the gradients too. A failure raises `CheckError` (an AssertionError) with what was
expected, what came, and a hint that names the likely mistake (a wrong scale, a mask not
applied, one direction of the loss left out...). A pass prints one line.

The exercises live in the notebooks, between `### BEGIN SOLUTION` and `### END SOLUTION`;
`python -m minivl exercises` turns those blocks into stubs for the student version.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

TOLERANCE = 1e-6  # relative error in float64; a correct implementation gives ~1e-15


class CheckError(AssertionError):
    """A student's implementation does not match the reference."""


def rel_error(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).abs().max() / (a.abs() + b.abs()).max().clamp_min(1e-12)).item()


def _call(fn, name: str, *args):
    if not callable(fn):
        raise TypeError(f"{name}: pass your function itself (not its result), got {type(fn).__name__}")
    try:
        return fn(*args)
    except NotImplementedError:
        raise
    except Exception as e:  # a crash inside the student's code: say which call it was
        raise CheckError(f"{name}: your function raised {type(e).__name__}: {e}") from e


def _compare(name: str, got, want, hints=(), tol: float = TOLERANCE) -> None:
    """got vs want: type, shape, values; `hints` = [(wrong tensor, what that mistake is)] checked on failure."""
    if not torch.is_tensor(got):
        raise CheckError(f"{name}: expected a tensor of shape {tuple(want.shape)}, got {type(got).__name__}")
    if got.shape != want.shape:
        raise CheckError(f"{name}: expected shape {tuple(want.shape)}, got {tuple(got.shape)}")
    err = rel_error(got.detach(), want.detach())
    if not err < tol:  # NaN fails too
        hint = next((h for wrong, h in hints if wrong.shape == got.shape and rel_error(got.detach(), wrong) < tol),
                    "compare your steps with the cell above, one line at a time")
        raise CheckError(f"{name}: values differ from the reference (relative error {err:.2e}, want < {tol:.0e}). "
                         f"Hint: {hint}")


def _passed(name: str, err: float | None = None) -> None:
    print(f"✓ {name} matches the reference" + (f" (relative error {err:.1e})" if err is not None else ""))


# ---------------------------------------------------------------- 00 Shapes World
def box_iou(fn) -> None:
    """fn(a, b) -> IoU of two xyxy boxes given as (x1, y1, x2, y2) tuples, a float."""
    from minivl.metrics import box_iou as ref
    cases = [((0, 0, 10, 10), (5, 5, 15, 15)), ((0, 0, 10, 10), (20, 20, 30, 30)), ((0, 0, 10, 10), (0, 0, 10, 10)),
             ((2, 3, 9, 7), (4, 1, 6, 12)), ((0, 0, 4, 4), (4, 0, 8, 4))]
    for a, b in cases:
        got = _call(fn, "box_iou", a, b)
        want = ref(torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64))[0, 0].item()
        if not isinstance(got, (int, float)) and not (torch.is_tensor(got) and got.numel() == 1):
            raise CheckError(f"box_iou: expected a number, got {type(got).__name__}")
        if abs(float(got) - want) > 1e-9:
            union_hint = "the union is area(a) + area(b) - intersection" if want > 0 else \
                "boxes that do not overlap (or only touch) have intersection 0: clamp the widths at 0"
            raise CheckError(f"box_iou{a, b}: expected {want:.4f}, got {float(got):.4f}. Hint: {union_hint}")
    _passed("box_iou")


def to_tensor(fn) -> None:
    """fn(image uint8 numpy (H, W, 3)) -> float tensor (3, H, W) in [-1, 1] (0 -> -1, 255 -> 1)."""
    import numpy as np

    from minivl.data import image_to_tensor
    image = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    image[0, 0], image[0, 1] = 0, 255  # both ends of the range
    want = image_to_tensor(image).double()
    got = _call(fn, "to_tensor", image.copy())
    if torch.is_tensor(got) and got.shape == (6, 5, 3):
        raise CheckError("to_tensor: expected shape (3, H, W) = (3, 6, 5), got (6, 5, 3). Hint: PyTorch images are "
                         "channels first: permute(2, 0, 1) (or rearrange 'h w c -> c h w')")
    if torch.is_tensor(got) and not got.is_floating_point():
        raise CheckError(f"to_tensor: expected a float tensor, got {got.dtype}. Hint: convert before dividing")
    hints = [(want * 0.5 + 0.5, "that is [0, 1]: the course's models take [-1, 1], x / 127.5 - 1"),
             ((want * 0.5 + 0.5) * 255, "the values are still 0..255: scale them to [-1, 1]")]
    _compare("to_tensor", got.double() if torch.is_tensor(got) else got, want, hints)
    _passed("to_tensor", rel_error(got, want))


# ---------------------------------------------------------------- 01 ViT
def patch_embed(fn) -> None:
    """fn(images (B, 3, H, W), weight (D, 3, P, P)) -> (B, N, D) patch embeddings, row-major patches."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)
    weight = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    want = F.conv2d(images, weight, stride=4).flatten(2).transpose(1, 2)  # (B, N, D)
    got = _call(fn, "patch_embed", images, weight)
    col_major = F.conv2d(images, weight, stride=4).transpose(2, 3).flatten(2).transpose(1, 2)
    _compare("patch_embed", got, want, [(col_major, "patches go row by row (left to right, then down): "
                                                    "rearrange 'b c (gh p) (gw q) -> b (gh gw) (c p q)'")])
    _passed("patch_embed", rel_error(got, want))


def attention(fn) -> None:
    """fn(q, k, v, mask) -> softmax(q k^T / sqrt(d) + mask) v, with mask (T, S) bool: True = may attend."""
    g = torch.Generator().manual_seed(0)
    B, H, T, d = 2, 3, 5, 4
    q, k, v = (torch.randn(B, H, T, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.ones(T, T, dtype=torch.bool).tril()  # causal: a mask that matters
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    got = _call(fn, "attention", q, k, v, mask)
    with torch.no_grad():
        unscaled = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        unmasked = F.scaled_dot_product_attention(q, k, v)
        flipped = F.scaled_dot_product_attention(q, k, v, attn_mask=~mask | torch.eye(T, dtype=torch.bool))
    _compare("attention", got, want, [(unscaled, "divide the scores by sqrt(d) before the softmax"),
                                      (unmasked, "the mask is not applied: set scores where mask is False to -inf"),
                                      (flipped, "the mask is inverted: True means 'may attend'")])
    grads = torch.autograd.grad(got.sum(), (q, k, v))
    refs = torch.autograd.grad(want.sum(), (q, k, v))
    for name, a, b in zip("qkv", grads, refs):
        if rel_error(a, b) >= TOLERANCE:
            raise CheckError(f"attention: the output matches but the gradient w.r.t. {name} does not "
                             f"(relative error {rel_error(a, b):.2e}). Hint: avoid in-place edits and .detach()")
    _passed("attention", rel_error(got, want))


# ---------------------------------------------------------------- 02 text transformer
def merge(fn) -> None:
    """fn(ids: list[int], pair: (a, b), new_id) -> ids with every non-overlapping (a, b) replaced, left to right."""
    from minivl.tokenizer import _merge
    cases = [([1, 2, 3, 1, 2], (1, 2), 9), ([1, 1, 1], (1, 1), 7), ([5, 5, 5, 5], (5, 5), 8), ([], (1, 2), 3),
             ([1, 2], (2, 1), 4), ([3, 1, 2, 2, 1, 2], (1, 2), 6)]
    for ids, pair, new in cases:
        got = _call(fn, "merge", list(ids), pair, new)
        want = _merge(list(ids), *pair, new)
        if list(got) != want:
            hint = ("pairs overlap in 'a a a': after merging one, skip both of its tokens" if pair[0] == pair[1]
                    else "scan left to right; when ids[i], ids[i+1] is the pair, emit new_id and jump by 2")
            raise CheckError(f"merge({ids}, {pair}, {new}): expected {want}, got {list(got)}. Hint: {hint}")
    _passed("merge")


def causal_mask(fn) -> None:
    """fn(T) -> (T, T) bool, True where position t may attend to position s (s <= t)."""
    for T in (1, 4, 7):
        got = _call(fn, "causal_mask", T)
        want = torch.ones(T, T, dtype=torch.bool).tril()
        if not torch.is_tensor(got) or got.dtype != torch.bool:
            raise CheckError(f"causal_mask: expected a bool tensor, got {getattr(got, 'dtype', type(got).__name__)}")
        if got.shape != want.shape or not torch.equal(got, want):
            hint = "that is the transpose: row t (the query) may see columns 0..t" if got.shape == want.shape and \
                torch.equal(got, want.T) else "torch.tril of a (T, T) matrix of ones"
            raise CheckError(f"causal_mask({T}): expected\n{want.int()}\ngot\n{got.int() if torch.is_tensor(got) else got}."
                             f" Hint: {hint}")
    _passed("causal_mask")


def next_token_loss(fn) -> None:
    """fn(logits (B, T, V), input_ids (B, T), attention_mask (B, T)) -> mean cross-entropy of each next real token."""
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 6, 11
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    want = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    got = _call(fn, "next_token_loss", logits, ids, mask)
    with torch.no_grad():
        unshifted = F.cross_entropy(logits.reshape(-1, V), ids.masked_fill(mask == 0, -100).reshape(-1), ignore_index=-100)
        padded = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    _compare("next_token_loss", torch.as_tensor(got).reshape(()), want,
             [(unshifted, "position t predicts token t + 1: compare logits[:, :-1] with input_ids[:, 1:]"),
              (padded, "pad positions are counted: ignore targets where attention_mask is 0")])
    _passed("next_token_loss", rel_error(got, want))


# ---------------------------------------------------------------- 03 CLIP
def contrastive_loss(fn) -> None:
    """fn(image_features (B, E), text_features (B, E), temperature) -> CLIP's symmetric InfoNCE loss."""
    from minivl.clip import clip_loss
    g = torch.Generator().manual_seed(0)
    img = torch.randn(6, 8, generator=g, dtype=torch.float64)
    txt = (img + 0.8 * torch.randn(6, 8, generator=g, dtype=torch.float64)).requires_grad_()
    want = clip_loss(img, txt, 0.07).double()
    got = _call(fn, "contrastive_loss", img, txt, 0.07)
    with torch.no_grad():
        i, t = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
        logits = i @ t.T / 0.07
        target = torch.arange(6)
        one_way = F.cross_entropy(logits, target)
        raw = img @ txt.T / 0.07
        unnormalised = (F.cross_entropy(raw, target) + F.cross_entropy(raw.T, target)) / 2
        no_temp = (F.cross_entropy(i @ t.T, target) + F.cross_entropy((i @ t.T).T, target)) / 2
    _compare("contrastive_loss", torch.as_tensor(got).reshape(()).double(), want,
             [(one_way, "average both directions: images -> texts (rows) and texts -> images (columns)"),
              (unnormalised, "normalise the features to unit length first (F.normalize): dot products become cosines"),
              (no_temp, "divide the cosine similarities by the temperature")], tol=1e-5)
    _passed("contrastive_loss", rel_error(got, want))


def zero_shot_classify(fn) -> None:
    """fn(image_features (N, E), class_text_features (C, E)) -> (N,) predicted class = highest cosine."""
    g = torch.Generator().manual_seed(0)
    img, cls = torch.randn(20, 8, generator=g), torch.randn(5, 8, generator=g)
    cls = cls * torch.linspace(0.2, 5, 5)[:, None]  # class vectors of very different lengths
    want = (F.normalize(img, dim=-1) @ F.normalize(cls, dim=-1).T).argmax(-1)
    got = _call(fn, "zero_shot_classify", img, cls)
    if not torch.is_tensor(got) or got.shape != want.shape:
        raise CheckError(f"zero_shot_classify: expected a tensor of shape {tuple(want.shape)}, got "
                         f"{tuple(got.shape) if torch.is_tensor(got) else type(got).__name__}")
    if not torch.equal(got.long(), want):
        hint = "normalise the class embeddings: a long vector wins a dot product without being closer" \
            if torch.equal(got.long(), (img @ cls.T).argmax(-1)) else "argmax over classes of the cosine similarity"
        raise CheckError(f"zero_shot_classify: {int((got.long() != want).sum())} of {len(want)} predictions differ. "
                         f"Hint: {hint}")
    _passed("zero_shot_classify")


CHECKS = {f.__name__: f for f in (box_iou, to_tensor, patch_embed, attention, merge, causal_mask, next_token_loss,
                                  contrastive_loss, zero_shot_classify)}
__all__ = ["CheckError", "rel_error", *CHECKS]
