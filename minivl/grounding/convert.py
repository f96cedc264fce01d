"""Port `transformers.OwlViTForObjectDetection` weights into minivl's OWL-ViT, and back as a config.

OWL-ViT's towers *are* CLIP's (`owlvit.vision_model` / `owlvit.text_model` / the projections), so
their renaming is `minivl.clip.convert`'s table under an "owlvit." prefix; the heads keep their
names (`class_head.dense0`, `logit_shift`, `logit_scale`, `box_head.dense0..2`, `layer_norm`). A
tiny random `OwlViTForObjectDetection`, ported, gives the same logits and boxes
(tests/test_grounding.py) - the proof that the from-scratch detector is the real one.

The one idea to take away: a detector built on CLIP is CLIP's state dict plus a handful of head
tensors; porting it is renaming.

Differences to know about (none changes the function on minivl's inputs):
- The box bias: transformers (and scenic) anchor each patch's box at its bottom-right *corner*
  ((i + 1) / grid); minivl's presets at its centre ((i + 0.5) / grid). A port sets
  box_anchor="corner", so the function is the same.
- Text pooling: transformers OWL-ViT pools at argmax(input_ids) - the eos when it is the largest
  id in the row (minivl's tokenizer: eos 506 above every ordinary token and the pad 504);
  minivl pools at the last real token. The same place for minivl-tokenised text.
- Padding queries: transformers marks a query as padding when its first token is 0; minivl takes
  an explicit query_mask. The class head needs text width == projection dim in transformers
  (its dense0 maps to text_config.hidden_size); `hf_config_from` refuses other configs, and configs with
  minivl's own options on (NOT_IN_TRANSFORMERS: the class positions, the box head's first-layer detail,
  the fusion enhancer, the dense box lessons, the centre prior).
"""
from __future__ import annotations

from minivl.clip.convert import config_from_hf as clip_config_from_hf
from minivl.clip.convert import hf_config_from as clip_hf_config_from
from minivl.clip.convert import rename_hf_key as clip_rename
from minivl.clip.convert import state_dict_from_hf as clip_state_dict_from_hf
from minivl.grounding.model import OWLViT, OWLViTConfig

HEAD_PREFIXES = ("class_head.", "box_head.", "layer_norm.")
# minivl's options that transformers' OWL-ViT lacks, at their "off" values (the plain OWL-ViT)
PLAIN = dict(class_positions=False, box_detail=False, fusion_depth=0, dense_boxes=0.0, cost_center=0.0)
NOT_IN_TRANSFORMERS = tuple(PLAIN)
SPELLING = {"vision_model.pre_layernorm.": "vision_model.pre_layrnorm."}  # OWL-ViT fixed CLIP's typo


def rename_hf_key(key: str) -> str | None:
    """transformers OwlViTForObjectDetection name -> minivl OWLViT name (None: a buffer minivl recomputes)."""
    if key.startswith(HEAD_PREFIXES):
        return key
    if key.startswith("owlvit."):
        key = key[len("owlvit."):]
        for owl, clip in SPELLING.items():
            key = clip + key[len(owl):] if key.startswith(owl) else key
        name = clip_rename(key)
        return None if name is None else "clip." + name
    raise KeyError(f"no minivl name for the transformers OWL-ViT tensor {key!r}")


def state_dict_from_hf(hf_state_dict: dict) -> dict:
    """A transformers OWL-ViT state dict renamed into minivl's (same tensors, no copies)."""
    return clip_state_dict_from_hf(hf_state_dict, rename=rename_hf_key)


def config_from_hf(hf_config, pad_id: int | None = None) -> OWLViTConfig:
    """A transformers OwlViTConfig -> the OWLViTConfig of the same network (corner-anchored box bias)."""
    return OWLViTConfig(clip=clip_config_from_hf(hf_config, pad_id=pad_id), box_anchor="corner")


def hf_config_from(config: OWLViTConfig, eos_token_id: int, pad_token_id: int = 0, **kwargs):
    """The transformers OwlViTConfig of the same towers and heads as `config` (needs transformers)."""
    from transformers import OwlViTConfig as HFOwlViTConfig
    c = config.clip
    extras = {name: getattr(config, name) for name in NOT_IN_TRANSFORMERS if getattr(config, name)}
    if extras:
        raise ValueError(f"transformers' OWL-ViT has no {sorted(extras)} (minivl's additions, set here: {extras}); "
                         f"build the config with them off (0 / False) to compare with it")
    if c.text.width != c.embed_dim:
        raise ValueError(f"transformers' OWL-ViT class head maps to the text width, so it needs text width == "
                         f"embed_dim; got {c.text.width} and {c.embed_dim}")
    clip = clip_hf_config_from(c, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    drop = ("model_type", "architectures", "transformers_version", "_name_or_path")
    text = {k: v for k, v in clip.text_config.to_dict().items() if k not in drop}
    vision = {k: v for k, v in clip.vision_config.to_dict().items() if k not in drop}
    return HFOwlViTConfig(text_config=text, vision_config=vision, projection_dim=c.embed_dim,
                          logit_scale_init_value=clip.logit_scale_init_value, **kwargs)


def from_transformers(hf_model, pad_id: int | None = None) -> OWLViT:
    """A transformers OwlViTForObjectDetection -> a minivl OWLViT computing the same function."""
    from minivl.checkpoint import load_state_dict_checked
    model = OWLViT(config_from_hf(hf_model.config, pad_id=pad_id))
    load_state_dict_checked(model, state_dict_from_hf(hf_model.state_dict()))
    return model.to(next(hf_model.parameters()).dtype)


__all__ = ["PLAIN", "NOT_IN_TRANSFORMERS", "rename_hf_key", "state_dict_from_hf", "config_from_hf", "hf_config_from",
           "from_transformers"]
