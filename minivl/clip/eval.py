"""Using a trained CLIP without training it again: zero-shot classification, retrieval, linear probe.

Follows the evaluation protocols of CLIP (Radford et al., 2021): a zero-shot classifier whose
weights are the text embeddings of prompts such as "a photo of a {}" averaged over several
templates (prompt ensembling, Sec. 3.1.4); image-text retrieval scored by recall@K; and a linear
probe - logistic regression on frozen image features - as the "how much does the image tower
know" reference that zero-shot is compared against.

The one idea to take away: after contrastive training a *sentence* is a classifier. Embed the
class names once, and classifying an image is a dot product with each class embedding; a new
class costs a new sentence, not a new training run.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from minivl import validate
from minivl.metrics import confusion_matrix, retrieval_metrics, topk_accuracy

# Prompt templates in the voice of Shapes World captions ("a large red circle", "there is one
# object: a red circle", ...). `{}` is the class name; "a" becomes "an" before a vowel afterwards.
SHAPES_TEMPLATES = ("a {}", "a small {}", "a large {}", "there is one object: a {}")


def fix_articles(text: str) -> str:
    """'a orange circle' -> 'an orange circle': templates are written once for every class name."""
    return re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", r"\1n ", text)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_images(model, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Images (N, 3, H, W) -> L2-normalised float32 embeddings (N, E), in batches, no gradients."""
    images = validate.tensor("images", images, shape=("N", 3, "H", "W"), kind="float", numpy=False,
                             hint="use minivl.clip.Preprocess on each image and torch.stack")
    batch_size = validate.positive_int("batch_size", batch_size)
    dev = _device(model)
    feats = [model.encode_image(images[i:i + batch_size].to(dev)).float() for i in range(0, len(images), batch_size)]
    return F.normalize(torch.cat(feats), dim=-1)  # (N, E)


@torch.no_grad()
def encode_texts(model, texts: list[str], tokenizer=None, batch_size: int = 256) -> torch.Tensor:
    """Strings -> L2-normalised float32 embeddings (N, E). Uses `model.tokenizer` unless given one."""
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or not texts:
        raise TypeError(f"texts must be a non-empty list of str, got {type(texts).__name__}")
    batch_size = validate.positive_int("batch_size", batch_size)
    if tokenizer is None:
        tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        from minivl.data import world_tokenizer
        tokenizer = world_tokenizer()
    dev, feats = _device(model), []
    for i in range(0, len(texts), batch_size):
        # padded to the longest text of the chunk, not the context length: less work, same result
        batch = tokenizer(list(texts[i:i + batch_size]))
        if batch["input_ids"].shape[1] > model.config.text.context_length:
            batch = tokenizer(list(texts[i:i + batch_size]), context_length=model.config.text.context_length)
        feats.append(model.encode_text({k: v.to(dev) for k, v in batch.items()}).float())
    return F.normalize(torch.cat(feats), dim=-1)  # (N, E)


def ensemble_class_embeddings(text_features: torch.Tensor) -> torch.Tensor:
    """(C classes, K templates, E) text embeddings -> (C, E) class embeddings.

    Prompt ensembling: normalise each template's embedding, average over templates, renormalise.
    """
    # empty (K = 0 templates) is rejected: the mean of nothing is NaN, a classifier that says nothing
    text_features = validate.tensor("text_features", text_features, shape=("C", "K", "E"), kind="float", finite=True)
    mean = F.normalize(text_features.float(), dim=-1).mean(1)  # (C, E)
    return F.normalize(mean, dim=-1)


def zero_shot_logits(image_features: torch.Tensor, class_embeddings: torch.Tensor,
                     scale: float | torch.Tensor = 100.0) -> torch.Tensor:
    """scale * cos(image, class): (N, E) x (C, E) -> (N, C). Softmax over C gives probabilities."""
    image_features = validate.tensor("image_features", image_features, shape=("N", "E"), kind="float", finite=True)
    class_embeddings = validate.tensor("class_embeddings", class_embeddings, shape=("C", "E"), kind="float",
                                       finite=True)
    scale = _scale(scale)
    if image_features.shape[1] != class_embeddings.shape[1]:
        raise ValueError(f"need (N, E) image features and (C, E) class embeddings, got "
                         f"{tuple(image_features.shape)} and {tuple(class_embeddings.shape)}")
    img = F.normalize(image_features.float(), dim=-1)
    return scale * img @ F.normalize(class_embeddings.float(), dim=-1).T  # (N, C)


def _scale(scale):
    """A positive finite logit scale; a negative one would rank every class backwards, silently."""
    if isinstance(scale, torch.Tensor) and scale.numel() == 1 and not validate.on_cpu(scale):
        return scale  # the model's own, on an accelerator: reading it back would be a host sync
    return validate.real("scale", scale, 0, low_open=True)


def zero_shot_predict(image_features: torch.Tensor, class_embeddings: torch.Tensor,
                      scale: float | torch.Tensor = 100.0) -> torch.Tensor:
    """Class probabilities (N, C): softmax of `zero_shot_logits`."""
    return zero_shot_logits(image_features, class_embeddings, scale).softmax(-1)


class ZeroShotClassifier:
    """A classifier made of sentences: `ZeroShotClassifier(model, ["red circle", ...])(images) -> probs`.

    Each class embedding is the prompt ensemble of `templates` filled with the class name.
    """

    def __init__(self, model, classnames: list[str], templates=SHAPES_TEMPLATES, tokenizer=None) -> None:
        if (not isinstance(classnames, (list, tuple)) or not classnames
                or not all(isinstance(c, str) for c in classnames)):
            raise TypeError(f"classnames must be a non-empty list of str, got {classnames!r}")
        if isinstance(templates, str) or not isinstance(templates, (list, tuple)) or not templates:
            raise ValueError(f"templates must be a non-empty list of strings with a '{{}}' slot, got {templates!r}")
        if not all(isinstance(t, str) and "{}" in t for t in templates):
            raise ValueError(f"templates must be strings with a '{{}}' slot, got {templates!r}")
        self.model, self.classnames, self.templates = model, list(classnames), list(templates)
        self.prompts = [[fix_articles(t.format(c)) for t in self.templates] for c in self.classnames]
        flat = encode_texts(model, [p for row in self.prompts for p in row], tokenizer)  # (C*K, E)
        self.class_embeddings = ensemble_class_embeddings(
            flat.reshape(len(self.classnames), len(self.templates), -1))  # (C, E)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, C), scaled by the model's learned 1/temperature."""
        return zero_shot_logits(encode_images(self.model, images), self.class_embeddings, self.model.scale().item())

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, C)."""
        return self.logits(images).softmax(-1)

    def predict(self, images: torch.Tensor) -> list[str]:
        return [self.classnames[i] for i in self.logits(images).argmax(-1).tolist()]


def zero_shot_eval(image_features: torch.Tensor, labels, class_embeddings: torch.Tensor,
                   ks=(1, 5)) -> dict:
    """Top-k accuracy and the confusion matrix (C, C) of the zero-shot classifier on given features."""
    logits = zero_shot_logits(image_features, class_embeddings)
    labels = _labels("labels", labels, logits.shape[0], logits.shape[1]).to(logits.device)
    ks = _ks(ks)
    out = topk_accuracy(logits, labels, ks=tuple(k for k in ks if k <= logits.shape[1]))
    out["confusion"] = confusion_matrix(logits.argmax(-1), labels, logits.shape[1])
    return out


def _labels(name: str, labels, n: int, num_classes: int | None = None) -> torch.Tensor:
    """n integer class ids (a tensor, numpy array or list) in [0, num_classes)."""
    if isinstance(labels, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
            raise TypeError(f"{name} must be a list of ints, got {labels!r:.80}")
        labels = torch.tensor(labels, dtype=torch.long)
    high = None if num_classes is None else num_classes - 1
    return validate.tensor(name, labels, shape=(n,), kind="int", low=0, high=high).long()


def _ks(ks) -> tuple[int, ...]:
    if isinstance(ks, (str, bytes)) or not isinstance(ks, (list, tuple)) or not ks:
        raise TypeError(f"ks must be a non-empty tuple of ints >= 1, got {ks!r}")
    return tuple(validate.positive_int("ks[i]", k) for k in ks)


def retrieval_eval(image_features: torch.Tensor, text_features: torch.Tensor, positives,
                   ks=(1, 5, 10)) -> dict[str, float]:
    """Recall@K and median rank both ways; `positives[i, j]` is True when text j describes image i."""
    image_features = validate.tensor("image_features", image_features, shape=("N", "E"), kind="float", finite=True)
    text_features = validate.tensor("text_features", text_features, shape=("M", "E"), kind="float", finite=True)
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(f"need (N, E) image and (M, E) text features, got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    shape = (image_features.shape[0], text_features.shape[0])
    positives = validate.tensor("positives", positives, shape=shape, kind="bool")
    sim = F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).T  # (N, M)
    return retrieval_metrics(sim.cpu(), positives.cpu(), ks=_ks(ks))


def linear_probe(train_features: torch.Tensor, train_labels, test_features: torch.Tensor, test_labels,
                 num_classes: int | None = None, l2: float = 1e-3, max_iter: int = 200) -> dict:
    """Multinomial logistic regression on frozen features (L-BFGS), scored on the test set.

    Features are standardised with the training set's statistics; `l2` penalises the weights.
    Returns dict(train_acc, test_acc, weight (C, E), bias (C,), mean, std).
    """
    x = validate.tensor("train_features", train_features, shape=("N", "E"), kind="float").float().cpu()
    xt = validate.tensor("test_features", test_features, shape=("N", "E"), kind="float").float().cpu()
    for name, f in (("train_features", x), ("test_features", xt)):  # now on the CPU: values are free to read
        validate.tensor(name, f, finite=True)
    if x.shape[1] != xt.shape[1]:
        raise ValueError(f"train and test features must have the same width E, got {tuple(x.shape)}, {tuple(xt.shape)}")
    if num_classes is not None:
        num_classes = validate.positive_int("num_classes", num_classes)
    y = _labels("train_labels", train_labels, len(x), num_classes).cpu()
    yt = _labels("test_labels", test_labels, len(xt), num_classes).cpu()
    l2 = validate.real("l2", l2, 0)
    max_iter = validate.positive_int("max_iter", max_iter)
    C = num_classes or int(max(y.max(), yt.max())) + 1
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x, xt = (x - mean) / std, (xt - mean) / std
    weight = torch.zeros(C, x.shape[1], requires_grad=True)
    bias = torch.zeros(C, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        train_acc = ((x @ weight.T + bias).argmax(1) == y).float().mean().item()
        test_acc = ((xt @ weight.T + bias).argmax(1) == yt).float().mean().item()
    return {"train_acc": train_acc, "test_acc": test_acc, "weight": weight.detach(), "bias": bias.detach(),
            "mean": mean, "std": std}


__all__ = ["SHAPES_TEMPLATES", "fix_articles", "encode_images", "encode_texts", "ensemble_class_embeddings",
           "zero_shot_logits", "zero_shot_predict", "ZeroShotClassifier", "zero_shot_eval", "retrieval_eval",
           "linear_probe"]
