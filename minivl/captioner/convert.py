"""Port `transformers` BLIP weights into minivl's Captioner (the proof that it is the same model).

`from_transformers(caption_model, retrieval_model=None)` takes a `BlipForConditionalGeneration`
(vision tower + text decoder + LM head) and optionally a `BlipForImageTextRetrieval` (its text
encoder, ITC projections and ITM head). In minivl one text transformer serves both; transformers
(and the released BLIP checkpoints) keep two copies, so with both models given the retrieval
model's vision tower and text stack go into a second Captioner: `(captioner, matcher)`.

What changes on the way: the ViT's fused qkv projection is cut into q, k and v; BLIP's ViT has a
patch-embedding bias and no LayerNorm before the blocks (`ViTConfig(patch_bias=True, ln_pre=False)`);
BERT's post-norm LayerNorms become the block's ln_1 / ln_cross / ln_2 (`Block(post_norm=True)`); the
LM head's decoder is tied to the token embeddings and keeps its own bias. Every tensor of the
source is used exactly once and every tensor of the target is written (checked, with shapes).

The one idea to take away: if a from-scratch model and the reference give the same logits on the
same weights, every design decision in between is verified at once.
"""
from __future__ import annotations

import torch

from minivl.captioner.model import Captioner, CaptionerConfig
from minivl.captioner.text import BertTextConfig
from minivl.vit import ViTConfig


def config_from_transformers(hf_config, prompt: str = "", decoder_self_attention: bool = False,
                             **ids) -> CaptionerConfig:
    """A CaptionerConfig with the architecture of a transformers `BlipConfig`.

    decoder_self_attention: give the text side BLIP's separate decoder self-attention (the captioning
    model's self-attention weights then go there, the encoder's stays at its init).

    ids: pad_id / bos_id ([CLS], ITC) / eos_id ([SEP]) / enc_id / dec_id; by default pad, [SEP] and
    [DEC] come from the text config, [CLS] = 101 and [ENC] = [DEC] + 1 (BERT's and BLIP's) where
    the vocabulary has them, else small ids (tiny test vocabularies)."""
    v, t = hf_config.vision_config, hf_config.text_config
    if v.intermediate_size % v.hidden_size or t.intermediate_size % t.hidden_size:
        raise ValueError("intermediate_size must be a multiple of hidden_size (minivl stores mlp_ratio)")
    vision = ViTConfig(image_size=v.image_size, patch_size=v.patch_size, width=v.hidden_size,
                       depth=v.num_hidden_layers, heads=v.num_attention_heads,
                       mlp_ratio=v.intermediate_size / v.hidden_size, activation=_act(v.hidden_act),
                       norm_eps=v.layer_norm_eps, patch_bias=True, ln_pre=False)
    text = BertTextConfig(vocab_size=t.vocab_size, context_length=t.max_position_embeddings, width=t.hidden_size,
                          depth=t.num_hidden_layers, heads=t.num_attention_heads,
                          mlp_ratio=t.intermediate_size / t.hidden_size, activation=_act(t.hidden_act),
                          norm_eps=t.layer_norm_eps, memory_dim=v.hidden_size,
                          decoder_self_attention=decoder_self_attention)
    V = t.vocab_size
    dec = t.bos_token_id
    defaults = dict(pad_id=t.pad_token_id, eos_id=t.sep_token_id, dec_id=dec,
                    enc_id=dec + 1 if dec + 1 < V else max(0, dec - 1), bos_id=101 if V > 103 else 1)
    return CaptionerConfig(vision=vision, text=text, vocab_size=V, embed_dim=hf_config.image_text_hidden_size,
                           label_smoothing=t.label_smoothing, prompt=prompt, **{**defaults, **ids})


def _act(name: str) -> str:
    known = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu"}
    if name not in known:
        raise ValueError(f"activation {name!r} has no minivl equivalent ({sorted(known)})")
    return known[name]


def _vision(sd: dict, prefix: str, depth: int) -> dict:
    """transformers BlipVisionModel keys (under prefix) -> minivl VisionTransformer keys (under 'vision.')."""
    out = {"vision.patch_embed.weight": sd[f"{prefix}embeddings.patch_embedding.weight"],
           "vision.patch_embed.bias": sd[f"{prefix}embeddings.patch_embedding.bias"],
           "vision.cls_token": sd[f"{prefix}embeddings.class_embedding"].reshape(-1),  # (1, 1, D) -> (D,)
           "vision.pos_embed": sd[f"{prefix}embeddings.position_embedding"][0],  # (1, 1 + N, D) -> (1 + N, D)
           "vision.ln_post.weight": sd[f"{prefix}post_layernorm.weight"],
           "vision.ln_post.bias": sd[f"{prefix}post_layernorm.bias"]}
    for i in range(depth):
        src, dst = f"{prefix}encoder.layers.{i}.", f"vision.transformer.blocks.{i}."
        for kind in ("weight", "bias"):
            q, k, v = sd[f"{src}self_attn.qkv.{kind}"].chunk(3, dim=0)  # (3D, ...) -> 3 x (D, ...)
            out.update({f"{dst}attn.q_proj.{kind}": q, f"{dst}attn.k_proj.{kind}": k, f"{dst}attn.v_proj.{kind}": v,
                        f"{dst}attn.out_proj.{kind}": sd[f"{src}self_attn.projection.{kind}"],
                        f"{dst}ln_1.{kind}": sd[f"{src}layer_norm1.{kind}"], f"{dst}ln_2.{kind}": sd[f"{src}layer_norm2.{kind}"],
                        f"{dst}mlp.fc1.{kind}": sd[f"{src}mlp.fc1.{kind}"], f"{dst}mlp.fc2.{kind}": sd[f"{src}mlp.fc2.{kind}"]})
    return out


def _text(sd: dict, prefix: str, depth: int, self_attn: tuple[str, str] = ("attn", "ln_1")) -> dict:
    """transformers BlipTextModel keys (under prefix) -> minivl BertText keys (under 'text.'); its
    self-attention and LayerNorm go to `self_attn` (("dec_attn", "ln_dec"): the decoder's own)."""
    out = {"text.token_embedding.weight": sd[f"{prefix}embeddings.word_embeddings.weight"],
           "text.pos_embed": sd[f"{prefix}embeddings.position_embeddings.weight"],
           "text.ln_embed.weight": sd[f"{prefix}embeddings.LayerNorm.weight"],
           "text.ln_embed.bias": sd[f"{prefix}embeddings.LayerNorm.bias"]}
    for i in range(depth):
        src, dst = f"{prefix}encoder.layer.{i}.", f"text.transformer.blocks.{i}."
        for kind in ("weight", "bias"):
            for theirs, ours, ln in (("attention", *self_attn), ("crossattention", "cross_attn", "ln_cross")):
                for a, b in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
                    out[f"{dst}{ours}.{b}.{kind}"] = sd[f"{src}{theirs}.self.{a}.{kind}"]
                out[f"{dst}{ours}.out_proj.{kind}"] = sd[f"{src}{theirs}.output.dense.{kind}"]
                out[f"{dst}{ln}.{kind}"] = sd[f"{src}{theirs}.output.LayerNorm.{kind}"]  # post-norm: after the sum
            out[f"{dst}mlp.fc1.{kind}"] = sd[f"{src}intermediate.dense.{kind}"]
            out[f"{dst}mlp.fc2.{kind}"] = sd[f"{src}output.dense.{kind}"]
            out[f"{dst}ln_2.{kind}"] = sd[f"{src}output.LayerNorm.{kind}"]
    return out


def _unported(cfg: CaptionerConfig, side: str) -> tuple[str, ...]:
    """Target keys one transformers model has no weights for: with decoder_self_attention the
    captioning model has no encoder self-attention, the retrieval model no decoder one."""
    if not cfg.text.decoder_self_attention:
        return ()
    names = ("attn.", "ln_1.") if side == "encoder" else ("dec_attn.", "ln_dec.")
    return tuple(f"text.transformer.blocks.{i}.{n}" for i in range(cfg.text.depth) for n in names)


class _Tracked(dict):
    """A state dict that remembers which keys were read (to prove every tensor was ported)."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def _load(model: Captioner, mapped: dict, source: dict, used_prefixes: tuple, skip: tuple) -> Captioner:
    """Load `mapped` into model: every target key written with its shape, every source key used."""
    target = model.state_dict()
    missing = [k for k in target if k not in mapped and not k.startswith(skip)]
    extra = [k for k in mapped if k not in target]
    if missing or extra:
        raise ValueError(f"port mismatch: {len(missing)} minivl tensors not written {missing[:5]}, "
                         f"{len(extra)} unknown {extra[:5]}")
    for k, v in mapped.items():
        if tuple(v.shape) != tuple(target[k].shape):
            raise ValueError(f"{k}: transformers gives {tuple(v.shape)}, minivl expects {tuple(target[k].shape)}")
    ignored = ("position_ids", "predictions.decoder.weight", "predictions.bias")  # a buffer and tied copies
    unused = [k for k in source if k.startswith(used_prefixes) and not k.endswith(ignored) and k not in source.read]
    if unused:
        raise ValueError(f"port mismatch: {len(unused)} transformers tensors unused, e.g. {unused[:5]}")
    with torch.no_grad():
        for k, v in mapped.items():
            target[k].copy_(v)
    return model


def from_transformers(caption_model=None, retrieval_model=None, config: CaptionerConfig | None = None,
                      decoder_self_attention: bool = False, **ids):
    """A Captioner with the weights of `BlipForConditionalGeneration` and/or `BlipForImageTextRetrieval`.

    One model given: a Captioner holding its weights (the other heads keep their random init). Both
    given: (captioner from the captioning model, matcher from the retrieval model) - two networks,
    as transformers ships them. The models are read on the CPU in float32. With
    decoder_self_attention (BLIP's separate causal self-attention in minivl's text side), the
    captioning model's self-attention fills the decoder's (`dec_attn`, `ln_dec`) and the retrieval
    model's the encoder's (`attn`, `ln_1`); each leaves the other at its init.
    """
    if caption_model is None and retrieval_model is None:
        raise ValueError("pass a BlipForConditionalGeneration, a BlipForImageTextRetrieval or both")
    out = []
    if caption_model is not None:
        if not hasattr(caption_model, "text_decoder"):
            raise TypeError(f"caption_model must be a BlipForConditionalGeneration, got {type(caption_model).__name__}")
        cfg = config or config_from_transformers(caption_model.config, decoder_self_attention=decoder_self_attention,
                                                 **ids)
        sd = _Tracked({k: v.detach().float().cpu() for k, v in caption_model.state_dict().items()})
        own = cfg.text.decoder_self_attention
        mapped = {**_vision(sd, "vision_model.", cfg.vision.depth),
                  **_text(sd, "text_decoder.bert.", cfg.text.depth, ("dec_attn", "ln_dec") if own else ("attn", "ln_1")),
                  "text.head_dense.weight": sd["text_decoder.cls.predictions.transform.dense.weight"],
                  "text.head_dense.bias": sd["text_decoder.cls.predictions.transform.dense.bias"],
                  "text.head_ln.weight": sd["text_decoder.cls.predictions.transform.LayerNorm.weight"],
                  "text.head_ln.bias": sd["text_decoder.cls.predictions.transform.LayerNorm.bias"],
                  "text.head_bias": sd["text_decoder.cls.predictions.decoder.bias"]}
        if not torch.equal(sd["text_decoder.cls.predictions.decoder.weight"], sd[
                "text_decoder.bert.embeddings.word_embeddings.weight"]):
            raise ValueError("the LM head is not tied to the word embeddings; minivl's BertText always ties them")
        out.append(_load(Captioner(cfg), mapped, sd, ("vision_model.", "text_decoder."),
                         skip=("vision_proj", "text_proj", "itm_head", "temp") + _unported(cfg, "encoder")))
    if retrieval_model is not None:
        if not hasattr(retrieval_model, "itm_head"):
            raise TypeError(f"retrieval_model must be a BlipForImageTextRetrieval, got {type(retrieval_model).__name__}")
        cfg = config or config_from_transformers(retrieval_model.config, decoder_self_attention=decoder_self_attention,
                                                 **ids)
        sd = _Tracked({k: v.detach().float().cpu() for k, v in retrieval_model.state_dict().items()})
        mapped = {**_vision(sd, "vision_model.", cfg.vision.depth), **_text(sd, "text_encoder.", cfg.text.depth)}
        for name in ("vision_proj", "text_proj", "itm_head"):
            mapped[f"{name}.weight"], mapped[f"{name}.bias"] = sd[f"{name}.weight"], sd[f"{name}.bias"]
        out.append(_load(Captioner(cfg), mapped, sd, ("vision_model.", "text_encoder.", "vision_proj", "text_proj",
                                                      "itm_head"), skip=("text.head", "temp") + _unported(cfg, "decoder")))
    return out[0] if len(out) == 1 else tuple(out)


__all__ = ["from_transformers", "config_from_transformers"]
