"""Port `transformers.ViltForQuestionAnswering` weights into minivl's ViLT, and back to a config.

minivl's ViLT with `stem="linear"` and `image_attends_text=True` is the network of Kim et al.
(2021) as `transformers` packages it; only the names differ. This module is the renaming table
and the two config translations, so that `tests/test_vqa.py` can build a random HF model, port
it, and find the same pooled output and logits, and `minivl.bench.vqa` can race the two.

The one idea to take away: two code bases that compute the same function differ by a
dictionary of names, plus the odd constant that can be folded (BERT's token-type embedding of
segment 0 is a vector added to every text token: it folds into the position table).

Differences to know about:
- HF's text embeddings add `token_type_embeddings[token_type_ids]`; ViLT's questions are one
  segment (ids 0), so row 0 is folded into minivl's text positions. Other segment ids are not
  supported by the port.
- HF samples `max_image_length` patches at random and shuffles their order; with
  `max_image_length=-1` every patch is kept, only reordered, which leaves the pooled output (read
  at the first text token) and the logits unchanged, but not the order of the patch tokens.
- HF pads images and passes a `pixel_mask`; minivl resizes instead, so compare full images.
"""
from __future__ import annotations

import torch

from minivl.vqa.model import ViltConfig, ViltForQuestionAnswering

LAYER_NAMES = {  # HF suffix inside `vilt.encoder.layer.{i}.` -> minivl suffix inside `transformer.blocks.{i}.`
    "layernorm_before": "ln_1", "layernorm_after": "ln_2",
    "attention.attention.query": "attn.q_proj", "attention.attention.key": "attn.k_proj",
    "attention.attention.value": "attn.v_proj", "attention.output.dense": "attn.out_proj",
    "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
}
TOP_NAMES = {
    "vilt.embeddings.text_embeddings.word_embeddings.weight": "word_embed.weight",
    "vilt.embeddings.text_embeddings.LayerNorm.weight": "text_norm.weight",
    "vilt.embeddings.text_embeddings.LayerNorm.bias": "text_norm.bias",
    "vilt.embeddings.patch_embeddings.projection.weight": "patch_embed.weight",
    "vilt.embeddings.patch_embeddings.projection.bias": "patch_embed.bias",
    "vilt.embeddings.token_type_embeddings.weight": "modality.weight",
    "vilt.layernorm.weight": "norm.weight", "vilt.layernorm.bias": "norm.bias",
    "vilt.pooler.dense.weight": "pooler.weight", "vilt.pooler.dense.bias": "pooler.bias",
    **{f"classifier.{i}.{p}": f"head.{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias")},
}
FOLDED = {  # handled by hand below
    "vilt.embeddings.text_embeddings.position_embeddings.weight", "vilt.embeddings.text_embeddings.token_type_embeddings.weight",
    "vilt.embeddings.cls_token", "vilt.embeddings.position_embeddings",
}
IGNORED = ("position_ids", "token_type_ids")  # HF buffers


def config_from_hf(hf_config) -> ViltConfig:
    """A `transformers.ViltConfig` -> the minivl ViltConfig of the same network."""
    if hf_config.hidden_act != "gelu" or not hf_config.qkv_bias or hf_config.num_channels != 3:
        raise ValueError("the port supports hidden_act='gelu', qkv_bias=True and RGB images")
    labels = hf_config.id2label
    answers = tuple(labels[i] for i in range(len(labels)))
    image = hf_config.image_size if isinstance(hf_config.image_size, int) else hf_config.image_size[0]
    return ViltConfig(vocab_size=hf_config.vocab_size, context_length=hf_config.max_position_embeddings,
                      pad_id=hf_config.pad_token_id or 0, image_size=image, patch_size=hf_config.patch_size,
                      width=hf_config.hidden_size, depth=hf_config.num_hidden_layers,
                      heads=hf_config.num_attention_heads, mlp_ratio=hf_config.intermediate_size / hf_config.hidden_size,
                      norm_eps=hf_config.layer_norm_eps, stem="linear", image_attends_text=True, answers=answers)


def hf_config_from(config: ViltConfig):
    """The `transformers.ViltConfig` of a minivl ViLT (linear stem, full attention), every patch kept."""
    from transformers import ViltConfig as HFViltConfig
    if config.stem != "linear" or not config.image_attends_text:
        raise ValueError("transformers' ViLT has a linear patch stem and full attention: need stem='linear', "
                         "image_attends_text=True")
    if config.position_every_layer or config.patch_classes:
        raise ValueError("transformers' ViLT adds the image positions once and has no region head: need "
                         "position_every_layer=False and patch_classes=()")
    return HFViltConfig(vocab_size=config.vocab_size, hidden_size=config.width, num_hidden_layers=config.depth,
                        num_attention_heads=config.heads, intermediate_size=int(config.width * config.mlp_ratio),
                        hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        max_position_embeddings=config.context_length, layer_norm_eps=config.norm_eps,
                        image_size=config.image_size, patch_size=config.patch_size, max_image_length=-1,
                        num_labels=config.num_labels, id2label=config.id2label, label2id=config.label2id,
                        pad_token_id=config.pad_id)


def state_dict_from_hf(sd: dict, config: ViltConfig) -> dict:
    """Rename (and fold) a HF ViltForQuestionAnswering state dict into minivl's names."""
    out, unused = {}, []
    for k, v in sd.items():
        if k.endswith(IGNORED) or k in FOLDED:
            continue
        if k in TOP_NAMES:
            out[TOP_NAMES[k]] = v
        elif k.startswith("vilt.encoder.layer."):
            i, rest = k[len("vilt.encoder.layer."):].split(".", 1)
            name, param = rest.rsplit(".", 1)
            if name not in LAYER_NAMES:
                unused.append(k)
                continue
            out[f"transformer.blocks.{i}.{LAYER_NAMES[name]}.{param}"] = v
        else:
            unused.append(k)
    if unused:
        raise ValueError(f"unexpected tensors in the HF state dict: {unused[:8]}")
    te = "vilt.embeddings.text_embeddings."
    # segment 0's token-type vector is added to every text token before the LayerNorm: fold it into positions
    out["text_pos"] = sd[te + "position_embeddings.weight"][:config.context_length] + sd[te + "token_type_embeddings.weight"][0]
    out["image_cls"] = sd["vilt.embeddings.cls_token"].reshape(-1)
    out["image_pos"] = sd["vilt.embeddings.position_embeddings"][0]  # (1 + N, D)
    return out


def from_transformers(hf_model) -> ViltForQuestionAnswering:
    """A `transformers.ViltForQuestionAnswering` -> minivl's model with the same weights (eval mode)."""
    config = config_from_hf(hf_model.config)
    model = ViltForQuestionAnswering(config)
    sd = state_dict_from_hf(hf_model.state_dict(), config)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"port mismatch: missing {missing}, unexpected {unexpected}")
    return model.eval()


def to_transformers(model: ViltForQuestionAnswering):
    """minivl's ViLT -> a `transformers.ViltForQuestionAnswering` computing the same function (eval mode)."""
    from transformers import ViltForQuestionAnswering as HFVilt
    hf = HFVilt(hf_config_from(model.config))
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    inverse = {v: k for k, v in TOP_NAMES.items()}
    inverse.update({f"transformer.blocks.{i}.{m}.{p}": f"vilt.encoder.layer.{i}.{h}.{p}"
                    for i in range(model.config.depth) for h, m in LAYER_NAMES.items() for p in ("weight", "bias")})
    te = "vilt.embeddings.text_embeddings."
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k in inverse:
                sd[inverse[k]] = v.clone()
        sd[te + "token_type_embeddings.weight"].zero_()
        sd[te + "position_embeddings.weight"][:model.config.context_length] = model.text_pos
        sd["vilt.embeddings.cls_token"] = model.image_cls.reshape(1, 1, -1).clone()
        sd["vilt.embeddings.position_embeddings"] = model.image_pos[None].clone()
    hf.load_state_dict(sd)
    return hf.eval()


__all__ = ["config_from_hf", "hf_config_from", "state_dict_from_hf", "from_transformers", "to_transformers"]
