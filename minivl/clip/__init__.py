"""CLIP (Radford et al., 2021), the contrastive family: the public API a notebook imports.

    import minivl.clip as clip
    model, preprocess = clip.load("clip-cpu")
    logits_per_image, logits_per_text = model(preprocess(image).unsqueeze(0), clip.tokenize(["a red circle"]))

The package's files, one concept each:
- `model.py`   the two towers, their projections, the learnable temperature and `clip_loss`
- `load.py`    the openai/clip-style interface: `load`, `save`, `tokenize`, `Preprocess`, `available_models`
- `eval.py`    zero-shot classification (prompt ensembles), retrieval recall@K, the linear probe
- `convert.py` the `transformers` CLIPModel port (imported on demand: it needs `transformers` only to run)
- `openai_bpe.py` OpenAI's BPE, from scratch (its merges read from the open_clip_torch package)
- `hub.py`     OpenAI's weights: `load("ViT-B/32")` downloads them (huggingface_hub, safetensors) into `OpenAICLIP`

OpenAI's weights, the same calls (online the first time; cached afterwards):

    model, preprocess = clip.load("ViT-B/32")
    text = clip.tokenize(["a dog", "a cat"], model=model)  # or model.tokenize(...): OpenAI's BPE, 77 ids

The one idea to take away: in a batch of B pairs, every other caption is a negative for an image,
so one contrastive objective turns any sentence into a classifier.
"""
from minivl.clip.eval import (SHAPES_TEMPLATES, ZeroShotClassifier, encode_images, encode_texts,
                              ensemble_class_embeddings, fix_articles, linear_probe, retrieval_eval, zero_shot_eval,
                              zero_shot_logits, zero_shot_predict)
from minivl.clip.hub import OPENAI_MODELS, OpenAICLIP
from minivl.clip.load import (OpenAIPreprocess, Preprocess, available_models, checkpoints_dir, load, local_models, save,
                              tokenize)
from minivl.clip.model import CLIP, CONTEXT_LENGTH, PRESETS, CLIPConfig, clip_loss
from minivl.clip.openai_bpe import OpenAITokenizer, openai_tokenizer

__all__ = ["CLIP", "CLIPConfig", "PRESETS", "CONTEXT_LENGTH", "clip_loss", "tokenize", "Preprocess",
           "available_models", "load", "save", "checkpoints_dir", "SHAPES_TEMPLATES", "ZeroShotClassifier",
           "fix_articles", "encode_images", "encode_texts", "ensemble_class_embeddings", "zero_shot_logits",
           "zero_shot_predict", "zero_shot_eval", "retrieval_eval", "linear_probe", "OpenAICLIP", "OpenAIPreprocess",
           "OpenAITokenizer", "openai_tokenizer", "OPENAI_MODELS", "local_models"]
