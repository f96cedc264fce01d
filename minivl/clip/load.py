"""Use minivl's CLIP the way `openai/clip` is used: `load`, `tokenize`, `preprocess`, `available_models`.

Mirrors the interface of OpenAI's `clip` package (Radford et al., 2021): `load(name)` returns the
model and the image transform it expects, `tokenize` turns strings into the fixed-length id tensor
the text tower reads, and a model name is simply a checkpoint folder that training wrote under
data/checkpoints - or one of OpenAI's names ("ViT-B/32"), whose weights `minivl.clip.hub` fetches,
with OpenAI's tokenizer and OpenAI's image transform. Everything here is re-exported by `minivl.clip`.

The one idea to take away: a checkpoint is more than weights. The same preprocessing and the same
tokenizer must travel with them, or the model sees inputs it was never trained on; so a CLIP
checkpoint folder carries its tokenizer.json, and `load` hands back the matching `preprocess`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import minivl
from minivl import validate
from minivl.checkpoint import checkpoints_dir, read_json, save_model
from minivl.clip import hub
from minivl.clip.hub import OPENAI_MEAN, OPENAI_MODELS, OPENAI_STD, OpenAICLIP
from minivl.clip.model import CLIP, CONTEXT_LENGTH
from minivl.clip.openai_bpe import CONTEXT_LENGTH as OPENAI_CONTEXT_LENGTH
from minivl.clip.openai_bpe import OpenAITokenizer
from minivl.data import world_tokenizer


def tokenize(texts: str | list[str], context_length: int | None = None, truncate: bool = False,
             tokenizer=None, model=None) -> torch.Tensor:
    """Texts -> (B, context_length) LongTensor of token ids, right-padded, bos ... eos, like `clip.tokenize`.

    A text longer than `context_length` raises ValueError unless `truncate=True`, which cuts it
    and keeps eos last. The default tokenizer is the Shapes World BPE every preset uses (context
    CONTEXT_LENGTH = 40); pass `tokenizer=model.tokenizer` to use the one saved with a checkpoint
    (they are the same file for checkpoints trained by `minivl.recipes.clip`), or `model=model` to
    get the vocabulary and context length of the model the ids are for: OpenAI's BPE (77 ids) for
    OpenAI's weights (`clip.load("ViT-B/32")`), Shapes World's for the course's checkpoints.
    """
    truncate = validate.boolean("truncate", truncate)
    if model is not None:
        if not isinstance(model, CLIP):
            raise TypeError(f"model must be a minivl CLIP (from clip.load), got {type(model).__name__}")
        own = model.tokenizer if model.tokenizer is not None else world_tokenizer()
        if tokenizer is not None and tokenizer is not own:
            raise ValueError(f"tokenizer {tokenizer!r} is not the one {type(model).__name__} reads ({own!r}): "
                             "pass one of tokenizer= or model=")
        tokenizer = own
        context_length = model.config.text.context_length if context_length is None else context_length
    if tokenizer is None:
        tokenizer = world_tokenizer()
    if context_length is None:
        context_length = OPENAI_CONTEXT_LENGTH if isinstance(tokenizer, OpenAITokenizer) else CONTEXT_LENGTH
    context_length = validate.positive_int("context_length", context_length)
    return tokenizer(texts, context_length=context_length, truncate=truncate)["input_ids"]  # (B, T)


class Preprocess:
    """Image -> (3, S, S) float tensor in [-1, 1], the input `CLIP.encode_image` expects.

    Takes a PIL image, a uint8 numpy array (H, W, 3), a uint8 tensor (H, W, 3) or (3, H, W), or a
    float tensor (3, H, W) in [0, 1]; resizes (bilinear, antialiased) when the size differs.
    """

    def __init__(self, image_size: int) -> None:
        self.image_size = validate.positive_int("image_size", image_size)

    def __repr__(self) -> str:
        return f"Preprocess(image_size={self.image_size}, range=[-1, 1])"

    def __call__(self, image) -> torch.Tensor:
        x = to_unit_float(image)  # (3, H, W) in [0, 1]
        if x.shape[1:] != (self.image_size, self.image_size):
            x = F.interpolate(x[None], size=(self.image_size,) * 2, mode="bilinear",
                              antialias=True, align_corners=False)[0].clamp(0, 1)
        return (x - 0.5) / 0.5  # (3, S, S), the minivl.data.image_to_tensor convention


def to_unit_float(image) -> torch.Tensor:
    """A PIL image, uint8 array (H, W, 3), uint8 tensor (H, W, 3) / (3, H, W) or float tensor (3, H, W)
    in [0, 1] -> float tensor (3, H, W) in [0, 1], or a clear TypeError/ValueError."""
    if type(image).__module__.startswith("PIL."):  # a PIL image, without importing PIL
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, torch.Tensor):
        if not isinstance(image, np.ndarray):
            raise TypeError(f"expected a PIL image, numpy array or tensor, got {type(image).__name__}")
        if image.dtype.name != "uint8" or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"numpy images must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
        image = torch.from_numpy(image.copy())
    if image.dim() != 3 or 3 not in (image.shape[0], image.shape[-1]) or image.numel() == 0:
        raise ValueError(f"image tensors must be (H, W, 3) or (3, H, W), non-empty, got {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        if image.shape[-1] == 3 and image.shape[0] != 3:
            image = image.permute(2, 0, 1)  # (3, H, W)
        return image.float() / 255
    if image.is_floating_point():
        if image.shape[0] != 3:
            raise ValueError(f"float image tensors must be (3, H, W), got {tuple(image.shape)}")
        if not torch.isfinite(image).all():  # NaN compares False both ways: the range test misses it
            raise ValueError("float image tensors must be finite, got NaN or inf pixels")
        if image.min() < 0 or image.max() > 1:
            raise ValueError(f"float image tensors must lie in [0, 1], got [{image.min():.3g}, {image.max():.3g}]")
        return image.float()
    raise TypeError(f"image tensors must be uint8 or float, got {image.dtype}")


def local_models() -> list[str]:
    """The CLIP checkpoints under data/checkpoints (written by training, or by `clip.save`)."""
    root, names = checkpoints_dir(), []
    if root.is_dir():
        for d in sorted(root.iterdir()):
            cfg = d / "config.json"
            if d.is_dir() and not d.name.startswith(".") and cfg.is_file():
                try:
                    if json.loads(cfg.read_text()).get("class") in ("CLIP", "OpenAICLIP"):
                        names.append(d.name)
                except (OSError, ValueError):
                    continue
    return names


def available_models() -> list[str]:
    """Names `load` accepts: the local CLIP checkpoints, then OpenAI's ("ViT-B/32", ...; downloaded on first use)."""
    return local_models() + list(OPENAI_MODELS)


class OpenAIPreprocess:
    """Image -> (3, S, S) float tensor, OpenAI's transform: resize the short side to S (bicubic), centre
    crop S x S, normalise with OpenAI's mean and std. The input `OpenAICLIP.encode_image` expects.

    Takes what `Preprocess` takes. A PIL image is resized by PIL (exactly OpenAI's pipeline); arrays
    and tensors by torch's antialiased bicubic (within a few 1/255 of PIL's). An image with a short
    side under `min_size` pixels is refused: blown up 14x, it would be classified on blur. PIL modes
    with more than 8 bits per channel (I, F, I;16) are refused: converting them to RGB clips them.
    """

    MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")  # 8-bit modes

    def __init__(self, image_size: int, mean=OPENAI_MEAN, std=OPENAI_STD, min_size: int = 16) -> None:
        self.image_size = validate.positive_int("image_size", image_size)
        self.min_size = validate.positive_int("min_size", min_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __repr__(self) -> str:
        return f"OpenAIPreprocess(image_size={self.image_size}, resize=bicubic short side, centre crop, OpenAI mean/std)"

    def _resized(self, h: int, w: int) -> tuple[int, int]:
        if min(h, w) < self.min_size:
            raise ValueError(f"image is {h}x{w} pixels; OpenAI's CLIP needs a short side of at least "
                             f"{self.min_size} (it is resized to {self.image_size})")
        S = self.image_size  # torchvision's Resize(S): the short side becomes S, the long one int(S * long / short)
        return (S, int(S * w / h)) if h <= w else (int(S * h / w), S)

    def __call__(self, image) -> torch.Tensor:
        S = self.image_size
        if type(image).__module__.startswith("PIL."):
            from PIL import Image
            if image.mode not in self.MODES:
                raise ValueError(f"PIL image mode {image.mode!r} is not an 8-bit mode ({', '.join(self.MODES)}); "
                                 "converting it to RGB would clip it: scale it to 8 bits first")
            h, w = self._resized(image.height, image.width)
            image = image.convert("RGB").resize((w, h), Image.Resampling.BICUBIC)
            x = to_unit_float(np.asarray(image))  # (3, h, w)
        else:
            x = to_unit_float(image)  # (3, H, W) in [0, 1]
            h, w = self._resized(x.shape[1], x.shape[2])
            if (h, w) != tuple(x.shape[1:]):
                x = F.interpolate(x[None], size=(h, w), mode="bicubic", antialias=True,
                                  align_corners=False)[0].clamp(0, 1)  # (3, h, w)
        top, left = int(round((h - S) / 2.0)), int(round((w - S) / 2.0))  # torchvision's CenterCrop
        x = x[:, top:top + S, left:left + S]  # (3, S, S)
        return (x - self.mean) / self.std


def save(model, path, tokenizer=None) -> None:
    """Write a checkpoint folder: config.json + model.safetensors (+ tokenizer.json), atomically.

    The same as `model.save(path, tokenizer)`, the one save every minivl model uses."""
    if not isinstance(model, CLIP):
        raise TypeError(f"clip.save takes a CLIP model, got {type(model).__name__}")
    if isinstance(model, OpenAICLIP):
        model.save(path, tokenizer)  # no tokenizer file: OpenAI's BPE comes from its package
    else:
        save_model(model, path, tokenizer)


def load(name_or_path, device: str | torch.device | None = None, jit: bool = False, download_root=None) -> tuple:
    """-> (model in eval mode on `device`, preprocess), like `clip.load`.

    `name_or_path` is a name from `available_models()` or a folder. A local name or a minivl
    checkpoint folder gives a `CLIP`, its tokenizer (tokenizer.json) attached as `model.tokenizer`
    (`model.tokenize(texts)` uses it) and `Preprocess`. OpenAI's names ("ViT-B/32", ...) are
    fetched once from the Hugging Face hub into its cache (`download_root` = another cache folder)
    and give an `OpenAICLIP` with OpenAI's tokenizer and `OpenAIPreprocess`; so does a folder
    written by `transformers.CLIPModel.save_pretrained`. Offline with nothing cached: ConnectionError.
    `jit` is accepted for openai/clip's signature; minivl has no TorchScript models, so only False.
    """
    if jit is not False:
        raise ValueError(f"jit must be False: minivl's CLIP is plain PyTorch (no TorchScript archive), got {jit!r}")
    if not isinstance(name_or_path, (str, Path)):
        raise TypeError(f"name_or_path must be a str or Path, got {type(name_or_path).__name__}")
    path = Path(name_or_path)
    dev = minivl.device(None if device is None else str(device))
    if not (path / "config.json").is_file() and str(name_or_path) in OPENAI_MODELS:
        model = hub.load_openai(str(name_or_path), cache_dir=download_root)
    else:
        if not (path / "config.json").is_file():
            names = local_models()
            if str(name_or_path) not in names:
                listed = ", ".join(repr(n) for n in names) or "none yet (train one: python -m minivl train clip)"
                raise ValueError(f"unknown CLIP model {str(name_or_path)!r}; available models: {listed} "
                                 f"(in {checkpoints_dir()}), OpenAI's {', '.join(repr(n) for n in OPENAI_MODELS)} "
                                 "(downloaded on first use), or pass a checkpoint folder")
            path = checkpoints_dir() / str(name_or_path)
        meta = read_json(path / "config.json")
        if hub.is_transformers_folder(meta):
            model = hub.from_transformers_folder(path)
        elif isinstance(meta, dict) and meta.get("class") == "OpenAICLIP":
            model = OpenAICLIP.load(path)
        else:  # attaches the folder's tokenizer.json as model.tokenizer
            model = CLIP.load(path, map_location=dev)
    model = model.to(dev).eval()
    if isinstance(model, OpenAICLIP):
        return model, OpenAIPreprocess(model.config.vision.image_size)
    return model, Preprocess(model.config.vision.image_size)


__all__ = ["CONTEXT_LENGTH", "tokenize", "Preprocess", "OpenAIPreprocess", "to_unit_float", "checkpoints_dir",
           "available_models", "local_models", "save", "load"]
