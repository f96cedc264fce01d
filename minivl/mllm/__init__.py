"""LLaVA (Liu et al., 2023), the multimodal LLM family: the public API a notebook imports.

    from minivl import mllm
    model = mllm.LlavaModel(mllm.MLLMConfig.preset("cpu"))      # or recipes.load_or_train("mllm")
    processor = mllm.LlavaProcessor.from_model(model)
    inputs = processor(text="USER: <image>\\nWhat is in this image?\\nASSISTANT:", images=image)
    reply = processor.batch_decode(model.generate(**inputs, max_new_tokens=40), skip_special_tokens=True)

The package's files, one concept each:
- `model.py`     config + presets, the frozen CLIP tower read at a chosen layer (LLaVA: the penultimate), the projector
                 (optionally with pixel shuffle), the causal LM, image-token merging, `generate`
- `processor.py` `processor(text=..., images=...)`: `<image>` expansion, left padding, decoding
- `chat.py`      the fixed chat template and the assistant-only loss mask
- `data.py`      stage-1 caption chats, stage-2 conversations, LLaVA-format JSON + image folders
- `eval.py`      answers per question type, captions, boxes (IoU >= 0.5), the POPE probe
- `convert.py`   the transformers `LlavaForConditionalGeneration` port (needs transformers to run)

The one idea to take away: image tokens are just input vectors in the LM's sequence; a small
projector makes CLIP's patch features readable to a language model.
"""
from minivl.mllm.chat import apply_chat_template, assistant_mask, labels_for
from minivl.mllm.model import PRESETS, LlavaModel, MLLMConfig, Projector, load_parts, pixel_shuffle
from minivl.mllm.processor import LlavaProcessor

__all__ = ["MLLMConfig", "PRESETS", "LlavaModel", "Projector", "pixel_shuffle", "load_parts", "LlavaProcessor",
           "apply_chat_template", "assistant_mask", "labels_for"]
