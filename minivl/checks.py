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


# ---------------------------------------------------------------- 04 captioning
def hard_negatives(fn) -> None:
    """fn(sim (B, B), positives (B, B) bool, generator) -> (B,) for each image the index of a caption that is
    NOT a positive, drawn with probability softmax(sim[i]) over those captions (BLIP's ITM mining)."""
    g = torch.Generator().manual_seed(0)
    B, draws = 4, 400
    sim = torch.tensor([[5.0, 3.0, 1.0, 0.0], [2.0, 5.0, 2.0, 0.0], [1.0, 1.0, 5.0, 4.0], [0.0, 2.0, 4.0, 5.0]])
    positives = torch.eye(B, dtype=torch.bool)
    positives[0, 1] = positives[1, 0] = True  # captions 0 and 1 say the same thing: neither is a negative of the other
    want = sim.softmax(1).masked_fill(positives, 0)
    want = want / want.sum(1, keepdim=True)  # (B, B) the distribution each row's negative is drawn from
    counts = torch.zeros(B, B)
    for _ in range(draws // 100):
        picks = [_call(fn, "hard_negatives", sim.clone(), positives.clone(), g) for _ in range(100)]
        for pick in picks:
            pick = torch.as_tensor(pick)
            if pick.shape != (B,):
                raise CheckError(f"hard_negatives: expected shape ({B},), one caption index per image, got {tuple(pick.shape)}")
            counts[torch.arange(B), pick.long()] += 1
    freq = counts / counts.sum(1, keepdim=True)
    if (counts * positives).sum() > 0:
        raise CheckError("hard_negatives: a positive pair was drawn as a negative. Hint: zero the weights where "
                         "positives is True before drawing (masked_fill), so two identical captions are never a negative")
    if (freq.max(1).values > 0.999).all():
        raise CheckError("hard_negatives: every row always gives the same caption. Hint: BLIP *samples* the negative "
                         "(torch.multinomial on the softmax weights), so hard negatives vary from step to step")
    if (freq - want).abs().max() > 0.1:  # 400 draws: 4 standard deviations
        uniform = (~positives).float() / (~positives).float().sum(1, keepdim=True)
        hint = "weight the captions by softmax(sim) (the more similar, the more likely)" \
            if (freq - uniform).abs().max() < 0.1 else "draw with probability softmax(sim[i]) over the non-positives"
        raise CheckError(f"hard_negatives: drawn frequencies {freq.numpy().round(2).tolist()} differ from "
                         f"{want.numpy().round(2).tolist()}. Hint: {hint}")
    _passed("hard_negatives")


def caption_labels(fn) -> None:
    """fn(ids (B, L), mask (B, L), P) -> labels: a copy of ids with -100 (no loss) at the first P positions
    (the decoder's start token and the text prompt, which are given, not predicted) and at padding."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 50, (3, 9), generator=g)
    mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3, [1] * 4 + [0] * 5])
    for P in (1, 3):
        got = _call(fn, "caption_labels", ids.clone(), mask.clone(), P)
        want = ids.masked_fill(mask == 0, -100)
        want[:, :P] = -100
        if not torch.is_tensor(got) or got.shape != want.shape:
            raise CheckError(f"caption_labels: expected a tensor of shape {tuple(want.shape)}, got "
                             f"{tuple(got.shape) if torch.is_tensor(got) else type(got).__name__}")
        if not torch.equal(got.long(), want):
            pad_kept = bool(((got == ids) & (mask == 0)).any())
            hint = ("padding must be -100 too (mask == 0)" if pad_kept else
                    f"the first P = {P} positions (start token + prompt) are -100: the prompt is given, not predicted")
            raise CheckError(f"caption_labels(P={P}): expected\n{want}\ngot\n{got}. Hint: {hint}")
        if torch.equal(ids, want):
            raise CheckError("caption_labels: ids itself changed: return a copy (masked_fill, clone)")
    _passed("caption_labels")


# ---------------------------------------------------------------- 05 VQA
def soft_scores(fn) -> None:
    """fn(answers: list of the annotators' answers, label2id) -> (A,) float tensor: the VQA accuracy each
    vocabulary answer would get, min(1, (annotators who gave it) / 3) averaged over the 10 leave-one-out
    sets of 9 annotators (one answer only: 1 for it)."""
    from minivl.vqa.data import soft_scores as ref
    label2id = {a: i for i, a in enumerate(["yes", "no", "2", "3", "red", "blue"])}
    cases = [["yes"] * 10, ["yes"] * 7 + ["no"] * 3, ["2"] * 4 + ["3"] * 4 + ["red", "blue"], ["red"] * 2 + ["blue"] * 8,
             ["no"], ["green"] * 6 + ["red"] * 4, ["3"] * 3 + ["2"] * 7]
    for answers in cases:
        got = _call(fn, "soft_scores", list(answers), dict(label2id))
        want = ref(list(answers), label2id).double()
        simple = torch.tensor([min(1.0, answers.count(a) / 3) for a in label2id], dtype=torch.float64)
        onehot = torch.zeros(len(label2id), dtype=torch.float64)
        top = max(label2id, key=answers.count)
        onehot[label2id[top]] = 1.0
        if not torch.is_tensor(got):
            raise CheckError(f"soft_scores: expected a tensor of shape ({len(label2id)},), got {type(got).__name__}")
        _compare(f"soft_scores({answers})", got.double(), want,
                 [(simple, "close: the metric averages min(1, count / 3) over the 10 sets of 9 annotators "
                           "(leave one out), so 3 of 10 annotators give 0.9, not 1"),
                  (onehot, "soft targets give partial credit to every answer some annotators gave, not a one-hot")])
    _passed("soft_scores")


def vqa_loss(fn) -> None:
    """fn(logits (B, A), targets (B, A) soft scores in [0, 1]) -> ViLT's loss: binary cross-entropy of each
    answer as its own yes/no (sigmoid), averaged and multiplied by the number of answers A."""
    from minivl.vqa.model import vqa_loss as ref
    g = torch.Generator().manual_seed(0)
    logits = (2 * torch.randn(5, 9, generator=g, dtype=torch.float64)).requires_grad_()
    targets = torch.zeros(5, 9, dtype=torch.float64)
    targets[torch.arange(5), torch.randint(0, 9, (5,), generator=g)] = 1.0
    targets[0, 3], targets[1, 4] = 0.3, 0.6  # partial credit
    want = ref(logits, targets).double()
    got = _call(fn, "vqa_loss", logits, targets)
    with torch.no_grad():
        mean = F.binary_cross_entropy_with_logits(logits, targets)
        softmax = -(targets * logits.log_softmax(-1)).sum(-1).mean()
    _compare("vqa_loss", torch.as_tensor(got).reshape(()).double(), want,
             [(mean, "ViLT multiplies the mean BCE by the number of answers (the sum over answers, per question)"),
              (softmax, "each answer is its own yes/no: sigmoid + binary cross-entropy, not a softmax over answers")])
    _passed("vqa_loss", rel_error(got, want))


# ---------------------------------------------------------------- 06 grounding
def focal_loss(fn) -> None:
    """fn(logits, targets, alpha, gamma) -> elementwise sigmoid focal loss, alpha_t (1 - p_t)^gamma BCE (Lin et al., 2017)."""
    from minivl.grounding.loss import sigmoid_focal_loss as ref
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(6, 7, generator=g, dtype=torch.float64)).requires_grad_()
    targets = (torch.rand(6, 7, generator=g) < 0.3).double()
    want = ref(logits, targets, 0.25, 2.0).double()
    got = _call(fn, "focal_loss", logits, targets, 0.25, 2.0)
    with torch.no_grad():
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        no_alpha = ref(logits, targets, -1, 2.0).double()
        swapped = ref(logits, 1 - targets, 0.25, 2.0).double()
    _compare("focal_loss", got.double() if torch.is_tensor(got) else got, want,
             [(bce, "that is plain BCE: multiply by (1 - p_t)^gamma, so confident right answers count little"),
              (no_alpha, "weight positives by alpha and negatives by 1 - alpha"),
              (swapped, "p_t is p where the target is 1 and 1 - p where it is 0")], tol=1e-5)
    _passed("focal_loss", rel_error(got, want))


def box_bias(fn) -> None:
    """fn(row, col, grid) -> (4,) the box bias of patch (row, col) in logit space: inverse sigmoid of the
    normalised cxcywh box centred on the patch and one patch wide (OWL-ViT's prior)."""
    from minivl.grounding.model import box_bias as ref
    for grid in (4, 8):
        table = ref(grid).double()
        for row, col in ((0, 0), (1, grid - 1), (grid - 1, 2)):
            got = _call(fn, "box_bias", row, col, grid)
            want = table[row * grid + col]
            plain = want.sigmoid()
            swapped = table[col * grid + row]
            corner = ref(grid, anchor="corner").double()[row * grid + col]
            _compare(f"box_bias({row}, {col}, {grid})", torch.as_tensor(got).double(), want,
                     [(plain, "that is the box itself: the bias lives in logit space, log(p / (1 - p))"),
                      (swapped, "x goes with the column and y with the row (patches are numbered row by row)"),
                      (corner, "the centre of patch (row, col) is ((col + 0.5) / grid, (row + 0.5) / grid)")], tol=1e-5)
    _passed("box_bias")


def match(fn) -> None:
    """fn(cost (N, G)) -> (rows, cols): a one-to-one assignment of the G targets to G of the N predictions
    with the least total cost (bipartite matching, as DETR and OWL-ViT train)."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment
    rng = np.random.default_rng(0)
    costs = [np.array([[1.0, 2.0], [1.1, 9.0], [5.0, 5.0]]), rng.random((9, 4)), rng.random((16, 3)) * 10]
    for cost in costs:
        rows, cols = (np.asarray(x) for x in _call(fn, "match", torch.tensor(cost)))
        G = cost.shape[1]
        if len(rows) != G or len(cols) != G or len(set(rows.tolist())) != G or sorted(cols.tolist()) != list(range(G)):
            raise CheckError(f"match: expected every one of the {G} targets matched to its own prediction, got rows "
                             f"{rows.tolist()} cols {cols.tolist()}. Hint: one prediction per target, none used twice")
        r, c = linear_sum_assignment(cost)
        best, got = cost[r, c].sum(), cost[rows, cols].sum()
        if got > best + 1e-9:
            raise CheckError(f"match: total cost {got:.3f}, the best assignment costs {best:.3f}. Hint: taking the "
                             f"cheapest pair first (greedy) can be beaten; scipy.optimize.linear_sum_assignment finds "
                             f"the optimum")
    _passed("match")


# ---------------------------------------------------------------- 07 multimodal LLM
def pixel_shuffle(fn) -> None:
    """fn(x (B, N, D) patch tokens on a g x g grid, row-major; r) -> (B, N / r², r² D): token (i, j) of the
    output concatenates the r x r patches (i r + a, j r + b), a then b (nanoVLM's space-to-depth)."""
    from minivl.mllm.model import pixel_shuffle as ref
    g = torch.Generator().manual_seed(0)
    for N, D, r in ((16, 3, 2), (64, 5, 2), (36, 2, 3)):
        x = torch.randn(2, N, D, generator=g, dtype=torch.float64)
        want = ref(x, r)
        got = _call(fn, "pixel_shuffle", x.clone(), r)
        naive = x.reshape(2, N // r ** 2, r ** 2 * D)  # consecutive tokens of a row, not a square block
        _compare(f"pixel_shuffle(N={N}, r={r})", got.double() if torch.is_tensor(got) else got, want,
                 [(naive, "a plain reshape groups r² tokens of one row: reshape to (B, g/r, r, g/r, r, D) and "
                          "move the two r axes next to D before flattening")])
    _passed("pixel_shuffle")


def assistant_labels(fn) -> None:
    """fn(ids: list[int], assistant_id, end_id) -> labels: the id on every token after an <|assistant|> marker
    up to and including its <|end|>, and -100 (ignored by the loss) everywhere else."""
    from minivl.mllm.chat import labels_for
    A, E, U, I = 90, 91, 92, 93  # assistant, end, user, image markers of a toy vocabulary
    cases = [[U, I, I, 5, 6, E, A, 7, 8, E], [U, 5, E, A, 7, E, U, 6, E, A, 8, 9, E], [U, 5, 6, E, A], [A, E]]
    for ids in cases:
        got = _call(fn, "assistant_labels", list(ids), A, E)
        want = labels_for(list(ids), A, E)
        if list(got) != want:
            bad = next(i for i, (a, b) in enumerate(zip(list(got) + [None] * len(want), want)) if a != b)
            if want[bad] == -100 and ids[bad] == A:
                hint = "the <|assistant|> marker is given in the prompt, not predicted: start after it"
            elif want[bad] == E:
                hint = "keep the <|end|> token: the model must learn to end its turn"
            elif want[bad] == -100:
                hint = "user turns and image positions are ignored (-100): the loss is on the assistant's tokens only"
            else:
                hint = "every assistant turn counts, not only the first or the last"
            raise CheckError(f"assistant_labels({ids}): expected {want}, got {list(got)} (first difference at "
                             f"position {bad}). Hint: {hint}")
    _passed("assistant_labels")


def box_to_pixels(fn) -> None:
    """fn(boxes (N, 4) normalised cxcywh, size (H, W)) -> (N, 4) absolute xyxy pixels: what `predict` returns,
    turned into what `post_process_object_detection` returns."""
    from minivl.metrics.boxes import box_convert
    g = torch.Generator().manual_seed(0)
    centre, wh = 0.2 + 0.6 * torch.rand(5, 2, generator=g, dtype=torch.float64), 0.05 + 0.3 * torch.rand(5, 2, generator=g, dtype=torch.float64)
    boxes = torch.cat([centre, wh], -1)
    H, W = 48, 80  # not square: (H, W) read as (W, H) shows
    scale = torch.tensor([W, H, W, H], dtype=torch.float64)
    got = _call(fn, "box_to_pixels", boxes.clone(), (H, W))
    want = box_convert(boxes, "cxcywh", "xyxy") * scale
    xywh = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, 2:]], -1) * scale
    _compare("box_to_pixels", torch.as_tensor(got).double(), want,
             [(box_convert(boxes, "cxcywh", "xyxy"), "scale by the image size: x by W, y by H (target_sizes are (H, W))"),
              (box_convert(boxes, "cxcywh", "xyxy") * torch.tensor([H, W, H, W], dtype=torch.float64),
               "x goes with the width W and y with the height H: size is (H, W)"),
              (xywh, "that is xywh (top-left corner + size, COCO's format); xyxy is both corners: x1 + w, y1 + h"),
              (boxes * scale, "convert the centre and size to corners first: x1 = cx - w / 2, x2 = cx + w / 2")])
    _passed("box_to_pixels", rel_error(got, want))


CHECKS = {f.__name__: f for f in (box_iou, to_tensor, patch_embed, attention, merge, causal_mask, next_token_loss,
                                  contrastive_loss, zero_shot_classify, hard_negatives, caption_labels, soft_scores, vqa_loss, focal_loss,
                                  box_bias, match, pixel_shuffle, assistant_labels, box_to_pixels)}
__all__ = ["CheckError", "rel_error", *CHECKS]
