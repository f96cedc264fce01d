"""Port `transformers` CLIP weights into minivl's CLIP, and describe a minivl CLIP as a `transformers` config.

minivl's CLIP is built from scratch, but it is the same network as OpenAI's CLIP (Radford et al.,
2021) as packaged by Hugging Face `transformers.CLIPModel`: same tensors, same shapes, only other
names. This module is the renaming table, plus the two config translations, so that
`tests/test_clip.py` can build a random `CLIPModel`, port it, and find the same embeddings and
logits - the proof that the from-scratch model is the real one - and `minivl.bench.clip` can
build a `CLIPModel` of exactly minivl's size to race against.

The one idea to take away: a model *is* its computation graph plus a state dict. When two code
bases compute the same function, moving weights between them is just a dictionary of names.

Differences to know about (none changes the function when inputs follow minivl's conventions):
- Text pooling. HF pools at the first `eos_token_id` in each row; minivl at the last real token
  (attention mask). The same position when texts end with eos and are right-padded, as minivl's
  tokenizer makes them. (HF keeps an old argmax-over-ids rule when eos_token_id == 2.)
- Image normalisation is the caller's: pass the same pixel tensor to both models.
- The logit scale: both store log(1/T); minivl clamps exp() at `logit_scale_max` in `forward`,
  HF does not clamp (OpenAI clamps the parameter during training).
"""
from __future__ import annotations

import math

import torch

from minivl.clip.model import CLIP, CLIPConfig
from minivl.text import TextConfig
from minivl.vit import ViTConfig

# the names inside one transformer layer: HF suffix -> minivl suffix
LAYER_NAMES = {
    "layer_norm1": "ln_1", "layer_norm2": "ln_2",
    "self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj",
    "self_attn.v_proj": "attn.v_proj", "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}
# everything outside the layers: HF name -> minivl name
TOP_NAMES = {
    "vision_model.embeddings.class_embedding": "visual.cls_token",
    "vision_model.embeddings.patch_embedding.weight": "visual.patch_embed.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.pos_embed",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "text_model.embeddings.token_embedding.weight": "text.token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "text.pos_embed",
    "text_model.final_layer_norm.weight": "text.ln_final.weight",
    "text_model.final_layer_norm.bias": "text.ln_final.bias",
    "visual_projection.weight": "visual_projection.weight",
    "text_projection.weight": "text_projection.weight",
    "logit_scale": "logit_scale",
}
TOWERS = {"vision_model": "visual", "text_model": "text"}
IGNORED = ("position_ids",)  # HF buffers that minivl computes on the fly


def rename_hf_key(key: str) -> str | None:
    """HF CLIPModel state-dict name -> minivl CLIP name (None for buffers minivl does not keep)."""
    if key in TOP_NAMES:
        return TOP_NAMES[key]
    if key.endswith(IGNORED):
        return None
    for hf_tower, tower in TOWERS.items():
        prefix = f"{hf_tower}.encoder.layers."
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            for hf_name, name in LAYER_NAMES.items():
                if rest.startswith(hf_name + "."):
                    return f"{tower}.transformer.blocks.{index}.{name}{rest[len(hf_name):]}"
    raise KeyError(f"no minivl name for the transformers CLIP tensor {key!r}")


def state_dict_from_hf(hf_state_dict: dict[str, torch.Tensor], rename=None) -> dict[str, torch.Tensor]:
    """A `transformers.CLIPModel` state dict renamed into minivl CLIP's (same tensors, no copies).
    `rename` (default `rename_hf_key`): key -> minivl name or None to drop; models built on CLIP's
    towers (OWL-ViT) pass their own."""
    rename = rename or rename_hf_key
    out = {}
    for key, tensor in hf_state_dict.items():
        name = rename(key)
        if name is not None:
            out[name] = tensor
    return out


def config_from_hf(hf_config, pad_id: int | None = None) -> CLIPConfig:
    """A `transformers.CLIPConfig` -> the CLIPConfig of the same network."""
    v, t = hf_config.vision_config, hf_config.text_config
    if v.num_channels != 3:
        raise ValueError(f"minivl's ViT reads RGB images, the config has num_channels={v.num_channels}")
    vision = ViTConfig(image_size=v.image_size, patch_size=v.patch_size, width=v.hidden_size,
                       depth=v.num_hidden_layers, heads=v.num_attention_heads,
                       mlp_ratio=v.intermediate_size / v.hidden_size, activation=_activation(v.hidden_act),
                       norm_eps=v.layer_norm_eps)
    text = TextConfig(vocab_size=t.vocab_size, context_length=t.max_position_embeddings, width=t.hidden_size,
                      depth=t.num_hidden_layers, heads=t.num_attention_heads,
                      mlp_ratio=t.intermediate_size / t.hidden_size, activation=_activation(t.hidden_act),
                      norm_eps=t.layer_norm_eps)
    scale = math.exp(hf_config.logit_scale_init_value)
    return CLIPConfig(vision=vision, text=text, embed_dim=hf_config.projection_dim,
                      logit_scale_init=scale, logit_scale_max=max(100.0, scale), pad_id=pad_id)


def _activation(hf_act: str) -> str:
    names = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
    if hf_act not in names:
        raise ValueError(f"activation {hf_act!r} has no minivl equivalent (known: {sorted(names)})")
    return names[hf_act]


def hf_config_from(config: CLIPConfig, eos_token_id: int, pad_token_id: int = 0, **kwargs):
    """The `transformers.CLIPConfig` of the same network as `config` (needs transformers).

    `eos_token_id` must be the id that ends every text (minivl's tokenizer: `tokenizer.eos_id`);
    it may not be 2, which HF reads as its legacy argmax rule. kwargs go to CLIPConfig (e.g.
    attn_implementation is set on the model instead).
    """
    from transformers import CLIPConfig as HFCLIPConfig
    if eos_token_id == 2:
        raise ValueError("eos_token_id=2 makes transformers pool at argmax(input_ids); use another id")
    v, t = config.vision, config.text
    acts = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
    vision = dict(hidden_size=v.width, intermediate_size=int(v.width * v.mlp_ratio), num_hidden_layers=v.depth,
                  num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
                  hidden_act=acts[v.activation], layer_norm_eps=v.norm_eps, attention_dropout=v.dropout,
                  projection_dim=config.embed_dim)
    text = dict(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=int(t.width * t.mlp_ratio),
                num_hidden_layers=t.depth, num_attention_heads=t.heads, max_position_embeddings=t.context_length,
                hidden_act=acts[t.activation], layer_norm_eps=t.norm_eps, attention_dropout=t.dropout,
                eos_token_id=eos_token_id, pad_token_id=pad_token_id, bos_token_id=max(0, eos_token_id - 1),
                projection_dim=config.embed_dim)
    return HFCLIPConfig(text_config=text, vision_config=vision, projection_dim=config.embed_dim,
                        logit_scale_init_value=math.log(config.logit_scale_init), **kwargs)


def from_transformers(hf_model, pad_id: int | None = None) -> CLIP:
    """A `transformers.CLIPModel` -> a minivl CLIP computing the same function."""
    model = CLIP(config_from_hf(hf_model.config, pad_id=pad_id))
    from minivl.checkpoint import load_state_dict_checked
    load_state_dict_checked(model, state_dict_from_hf(hf_model.state_dict()))
    return model.to(next(hf_model.parameters()).dtype)


__all__ = ["rename_hf_key", "state_dict_from_hf", "config_from_hf", "hf_config_from", "from_transformers"]
