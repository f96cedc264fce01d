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
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a (N, 3, H, W) tensor, got {getattr(images, 'shape', type(images))}")
    dev = _device(model)
    feats = [model.encode_image(images[i:i + batch_size].to(dev)).float() for i in range(0, len(images), batch_size)]
    return F.normalize(torch.cat(feats), dim=-1)  # (N, E)


@torch.no_grad()
def encode_texts(model, texts: list[str], tokenizer=None, batch_size: int = 256) -> torch.Tensor:
    """Strings -> L2-normalised float32 embeddings (N, E). Uses `model.tokenizer` unless given one."""
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or not texts:
        raise TypeError(f"texts must be a non-empty list of str, got {type(texts).__name__}")
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
    if not isinstance(text_features, torch.Tensor) or text_features.dim() != 3:
        raise ValueError(f"text_features must be (C, K, E), got {getattr(text_features, 'shape', type(text_features))}")
    mean = F.normalize(text_features.float(), dim=-1).mean(1)  # (C, E)
    return F.normalize(mean, dim=-1)


def zero_shot_logits(image_features: torch.Tensor, class_embeddings: torch.Tensor,
                     scale: float | torch.Tensor = 100.0) -> torch.Tensor:
    """scale * cos(image, class): (N, E) x (C, E) -> (N, C). Softmax over C gives probabilities."""
    if image_features.dim() != 2 or class_embeddings.dim() != 2 or image_features.shape[1] != class_embeddings.shape[1]:
        raise ValueError(f"need (N, E) image features and (C, E) class embeddings, got "
                         f"{tuple(image_features.shape)} and {tuple(class_embeddings.shape)}")
    img = F.normalize(image_features.float(), dim=-1)
    return scale * img @ F.normalize(class_embeddings.float(), dim=-1).T  # (N, C)


def zero_shot_predict(image_features: torch.Tensor, class_embeddings: torch.Tensor,
                      scale: float | torch.Tensor = 100.0) -> torch.Tensor:
    """Class probabilities (N, C): softmax of `zero_shot_logits`."""
    return zero_shot_logits(image_features, class_embeddings, scale).softmax(-1)


class ZeroShotClassifier:
    """A classifier made of sentences: `ZeroShotClassifier(model, ["red circle", ...])(images) -> probs`.

    Each class embedding is the prompt ensemble of `templates` filled with the class name.
    """

    def __init__(self, model, classnames: list[str], templates=SHAPES_TEMPLATES, tokenizer=None) -> None:
        if isinstance(classnames, str) or not classnames or not all(isinstance(c, str) for c in classnames):
            raise TypeError(f"classnames must be a non-empty list of str, got {classnames!r}")
        if isinstance(templates, str) or not templates or not all("{}" in t for t in templates):
            raise ValueError(f"templates must be a list of strings with a '{{}}' slot, got {templates!r}")
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
    labels = torch.as_tensor(labels, device=logits.device)
    out = topk_accuracy(logits, labels, ks=tuple(k for k in ks if k <= logits.shape[1]))
    out["confusion"] = confusion_matrix(logits.argmax(-1), labels, logits.shape[1])
    return out


def retrieval_eval(image_features: torch.Tensor, text_features: torch.Tensor, positives,
                   ks=(1, 5, 10)) -> dict[str, float]:
    """Recall@K and median rank both ways; `positives[i, j]` is True when text j describes image i."""
    if image_features.dim() != 2 or text_features.dim() != 2 or image_features.shape[1] != text_features.shape[1]:
        raise ValueError(f"need (N, E) image and (M, E) text features, got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    sim = F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).T  # (N, M)
    return retrieval_metrics(sim.cpu(), torch.as_tensor(positives).cpu(), ks=ks)


def linear_probe(train_features: torch.Tensor, train_labels, test_features: torch.Tensor, test_labels,
                 num_classes: int | None = None, l2: float = 1e-3, max_iter: int = 200) -> dict:
    """Multinomial logistic regression on frozen features (L-BFGS), scored on the test set.

    Features are standardised with the training set's statistics; `l2` penalises the weights.
    Returns dict(train_acc, test_acc, weight (C, E), bias (C,), mean, std).
    """
    x, xt = train_features.float().cpu(), test_features.float().cpu()
    y, yt = torch.as_tensor(train_labels).long().cpu(), torch.as_tensor(test_labels).long().cpu()
    if x.dim() != 2 or xt.dim() != 2 or x.shape[1] != xt.shape[1] or len(x) != len(y) or len(xt) != len(yt):
        raise ValueError(f"need features (N, E) with N labels for train and test, got {tuple(x.shape)}, "
                         f"{tuple(y.shape)}, {tuple(xt.shape)}, {tuple(yt.shape)}")
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
