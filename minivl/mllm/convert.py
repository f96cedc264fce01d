"""Port a `transformers` LlavaForConditionalGeneration (CLIP vision tower + GPT-2 text model) into LlavaModel.

minivl's LLaVA is the same network as transformers' `LlavaForConditionalGeneration` built with a
`CLIPVisionConfig` tower and a `GPT2Config` text model (minivl's CausalLM is GPT-2: learned
positions, pre-norm blocks with biases, LayerNorm eps 1e-5, tied embeddings; GPT-2's default
activation is the tanh GELU, "gelu_new", minivl's is the exact one: the config says which).
Only the names and the layout differ: GPT-2 stores its linear maps as `Conv1D` (weight (in, out),
the transpose of nn.Linear) and packs q, k, v into one `c_attn`. This module is the renaming table
plus the config translation; `tests/test_mllm.py` builds a random model offline, ports it, and
finds the same logits; `minivl.bench.mllm` races the two at the same size.

What has no transformers equivalent: pixel shuffle (nanoVLM) and a projector deeper than two
layers or of another hidden width; a config with those is refused by `hf_config_from`.

The one idea to take away: a model *is* its computation graph plus a state dict; here the graph
is three parts (tower, projector, LM) glued by one `masked_scatter` of image features.
"""
from __future__ import annotations

import torch

from minivl.checkpoint import load_state_dict_checked
from minivl.clip.convert import rename_hf_key as clip_key
from minivl.lm import LMConfig
from minivl.mllm.model import LlavaModel, MLLMConfig
from minivl.vit import ViTConfig

_ACTS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "quick_gelu": "quick_gelu"}
_CLIP_ACTS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu"}
_GPT2_LAYER = {"ln_1": "ln_1", "ln_2": "ln_2", "attn.c_proj": "attn.out_proj", "mlp.c_fc": "mlp.fc1",
               "mlp.c_proj": "mlp.fc2"}


def hf_config_from(config: MLLMConfig, **kwargs):
    """The `transformers.LlavaConfig` (CLIP vision + GPT-2 text) of the same network as `config`."""
    from transformers import CLIPVisionConfig, GPT2Config, LlavaConfig
    if (config.pixel_shuffle != 1 or config.projector_depth != 2 or config.projector_norm or config.image_positions
            or config.projector_hidden not in (None, config.lm.width)):
        raise ValueError("transformers' LLaVA has a 2-layer projector of the LM's width, no norm, no pixel shuffle and "
                         "no image position table (image_positions=0); "
                         f"this config has pixel_shuffle={config.pixel_shuffle}, projector_depth={config.projector_depth}, "
                         f"projector_norm={config.projector_norm}, projector_hidden={config.projector_hidden}")
    v, t = config.vision, config.lm
    if v.image_mean != (0.0, 0.0, 0.0) or v.image_std != (1.0, 1.0, 1.0):
        raise ValueError("transformers' CLIP tower does not standardise inside the model: use identity image_mean/std")
    vision = CLIPVisionConfig(hidden_size=v.width, intermediate_size=int(v.width * v.mlp_ratio),
                              num_hidden_layers=v.depth, num_attention_heads=v.heads, image_size=v.image_size,
                              patch_size=v.patch_size, hidden_act=_CLIP_ACTS[v.activation], layer_norm_eps=v.norm_eps,
                              attention_dropout=0.0)
    text = GPT2Config(vocab_size=t.vocab_size, n_positions=t.context_length, n_embd=t.width, n_layer=t.depth,
                      n_head=t.heads, n_inner=int(t.width * t.mlp_ratio), activation_function=_ACTS[t.activation],
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=t.norm_eps,
                      bos_token_id=t.bos_id, eos_token_id=t.eos_id, pad_token_id=t.pad_id,
                      tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=config.image_token_id,
                       projector_hidden_act="gelu", vision_feature_layer=config.vision_layer,
                       vision_feature_select_strategy="default", multimodal_projector_bias=True,
                       tie_word_embeddings=False, **kwargs)  # LLaVA ties by llama's name (embed_tokens),
    #                                         which GPT-2 lacks: lm_head is a copy of wte instead (same function)


def config_from_hf(hf_config) -> MLLMConfig:
    """A `transformers.LlavaConfig` with a CLIP vision tower and a GPT-2 text model -> MLLMConfig."""
    v, t = hf_config.vision_config, hf_config.text_config
    if t.model_type != "gpt2" or v.model_type != "clip_vision_model":
        raise ValueError(f"only CLIP vision + GPT-2 text LLaVAs port to minivl, got {v.model_type} + {t.model_type}")
    if hf_config.vision_feature_select_strategy != "default" or not isinstance(hf_config.vision_feature_layer, int):
        raise ValueError("minivl reads one vision layer without the class token (strategy 'default')")
    acts = {value: key for key, value in _ACTS.items()} | {"gelu_pytorch_tanh": "gelu_tanh"}
    tied = bool(hf_config.tie_word_embeddings)  # untied models port with tie_embeddings=False (two matrices)
    vision = ViTConfig(image_size=v.image_size, patch_size=v.patch_size, width=v.hidden_size, depth=v.num_hidden_layers,
                       heads=v.num_attention_heads, mlp_ratio=v.intermediate_size / v.hidden_size,
                       activation=acts[v.hidden_act], norm_eps=v.layer_norm_eps)
    lm = LMConfig(vocab_size=t.vocab_size, context_length=t.n_positions, width=t.n_embd, depth=t.n_layer,
                  heads=t.n_head, mlp_ratio=(t.n_inner or 4 * t.n_embd) / t.n_embd,
                  activation=acts[t.activation_function], norm_eps=t.layer_norm_epsilon,
                  tie_embeddings=tied, pad_id=t.pad_token_id, bos_id=t.bos_token_id,
                  eos_id=t.eos_token_id)
    return MLLMConfig(vision=vision, lm=lm, vision_layer=hf_config.vision_feature_layer, pixel_shuffle=1,
                      image_token_id=hf_config.image_token_index)


def state_dict_from_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LlavaForConditionalGeneration state dict -> LlavaModel's (Conv1D weights transposed, c_attn split)."""
    out = {}
    for key, w in sd.items():
        if key.startswith("model.vision_tower."):
            key = key[len("model.vision_tower."):]
            name = clip_key(key if key.startswith("vision_model.") else "vision_model." + key)  # either layout
            if name is not None:
                out["vision." + name[len("visual."):]] = w
        elif key.startswith("model.multi_modal_projector.linear_"):
            k, rest = key[len("model.multi_modal_projector.linear_"):].split(".", 1)
            out[f"projector.layers.{int(k) - 1}.{rest}"] = w
        elif key == "lm_head.weight":
            out["lm.lm_head.weight"] = w
        elif key.startswith("model.language_model."):
            out.update(_gpt2(key[len("model.language_model."):], w))
        else:
            raise KeyError(f"no minivl name for the transformers LLaVA tensor {key!r}")
    return out


def _gpt2(key: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    top = {"wte.weight": "lm.token_embedding.weight", "wpe.weight": "lm.pos_embed",
           "ln_f.weight": "lm.ln_final.weight", "ln_f.bias": "lm.ln_final.bias"}
    if key in top:
        return {top[key]: w}
    if not key.startswith("h."):
        raise KeyError(f"no minivl name for the GPT-2 tensor {key!r}")
    index, rest = key[2:].split(".", 1)
    prefix = f"lm.transformer.blocks.{index}."
    if rest in ("attn.bias", "attn.masked_bias"):  # causal-mask buffers of old GPT-2 code
        return {}
    if rest.startswith("attn.c_attn."):
        kind = rest.rsplit(".", 1)[1]
        q, k, v = (w.T if kind == "weight" else w).chunk(3, dim=0)  # Conv1D (in, 3D) -> 3 x Linear (D, in)
        return {f"{prefix}attn.{n}_proj.{kind}": t.contiguous() for n, t in zip("qkv", (q, k, v))}
    for hf, ours in _GPT2_LAYER.items():
        if rest.startswith(hf + "."):
            kind = rest[len(hf) + 1:]
            conv = hf != "ln_1" and hf != "ln_2"
            return {f"{prefix}{ours}.{kind}": (w.T.contiguous() if conv and kind == "weight" else w)}
    raise KeyError(f"no minivl name for the GPT-2 tensor {key!r}")


def from_transformers(hf_model) -> LlavaModel:
    """A `transformers.LlavaForConditionalGeneration` (CLIP + GPT-2) -> a LlavaModel computing the same function."""
    model = LlavaModel(config_from_hf(hf_model.config))
    load_state_dict_checked(model, state_dict_from_hf(hf_model.state_dict()))
    return model.to(next(hf_model.parameters()).dtype)


def to_transformers(model: LlavaModel, **kwargs):
    """The `transformers` LLaVA of the same size as `model`, carrying its weights (for the bench)."""
    from transformers import LlavaForConditionalGeneration
    hf = LlavaForConditionalGeneration(hf_config_from(model.config, **kwargs)).eval()
    ours, theirs, new = model.state_dict(), hf.state_dict(), {}
    for key in theirs:
        names = list(state_dict_from_hf({key: theirs[key]}))  # our tensor(s) behind this one
        if not names:
            continue
        conv = ".h." in key and key.endswith("weight") and (".attn.c_" in key or ".mlp.c_" in key)  # GPT-2 Conv1D
        t = torch.cat([ours[n] for n in names], 0) if len(names) > 1 else ours[names[0]]  # q, k, v -> c_attn
        new[key] = (t.T if conv else t).contiguous()
    hf.load_state_dict({**theirs, **new})
    return hf


__all__ = ["hf_config_from", "config_from_hf", "state_dict_from_hf", "from_transformers", "to_transformers"]
