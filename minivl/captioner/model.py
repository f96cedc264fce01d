"""BLIP: an image encoder and one text transformer trained with three objectives at once.

Follows "BLIP: Bootstrapping Language-Image Pre-training for Unified Vision-Language Understanding
and Generation" (Li et al., 2022), at course scale. The image encoder is minivl's ViT (started
from CLIP's vision tower when a CLIP checkpoint exists, as BLIP starts from a pretrained ViT); the
text side is `BertText`, one BERT-style stack used in three modes with shared weights:

- ITC, image-text contrastive: the unimodal text encoder's first token ([CLS] = bos) and the
  image's class token, projected and compared as in CLIP (`minivl.clip.clip_loss`);
- ITM, image-text matching: the text with [ENC] first, cross-attending to the patches; a binary
  head on [ENC] says "match" or "no match". Negatives are *hard*: for each image a wrong caption
  drawn in proportion to its ITC similarity, for each caption a wrong image, so the head learns
  the differences the contrastive space still confuses;
- LM, captioning: [DEC] + prompt ("a picture of") + caption, causal, cross-attending to the
  patches; next-token cross-entropy with label smoothing 0.1, pad and prompt positions ignored.

Loss = ITC + ITM + LM, each logged. Not reproduced from the paper: the momentum encoder with its
soft targets and feature queue, and CapFilt (bootstrapping captions from web data). As in BLIP,
the decoder has its own causal self-attention and shares everything else with the encoder
(`BertTextConfig.decoder_self_attention`; False shares that too, the earlier design, which the
ITC/ITM objectives then pull away from captioning).

The one idea to take away: understanding and generation can share one network. The encoder modes
teach the text side what in the picture each word refers to, which the decoder then uses to
say only what is there.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from minivl import generation, validate
from minivl.captioner.text import BertText, BertTextConfig
from minivl.checkpoint import Checkpointable
from minivl.clip.model import clip_loss
from minivl.tokenizer import Tokenizer
from minivl.vit import ViTConfig, VisionTransformer, check_images, neighbourhood

WORLD_VOCAB = 512  # the Shapes World BPE every preset reads
_PAD = WORLD_VOCAB - len(Tokenizer.SPECIAL_TOKENS)  # its <|pad|>, then <|bos|>, <|eos|>
IDS = dict(pad_id=_PAD, bos_id=_PAD + 1, eos_id=_PAD + 2, enc_id=WORLD_VOCAB, dec_id=WORLD_VOCAB + 1)
OBJECTIVES = ("itc", "itm", "lm")

PRESETS = {
    # every preset gives the decoder its own causal self-attention, as BLIP does
    "tiny": dict(vision=dict(image_size=32, patch_size=8, width=32, depth=2, heads=2),
                 text=dict(width=32, depth=2, heads=2, decoder_self_attention=True), embed_dim=32),
    # the vision tower is CLIP-cpu's (so its weights load), read at its penultimate hidden state (the
    # last block's patch outputs were never trained by CLIP); the text side the probe's 64 x 4
    "cpu": dict(vision=dict(image_size=64, patch_size=8, width=64, depth=4, heads=4),
                text=dict(width=64, depth=4, heads=4, decoder_self_attention=True), embed_dim=64, itm_rows=16,
                memory_layer=-2, matching_trains_vision=False,  # see CaptionerConfig.matching_trains_vision
                memory_detail=True, memory_detail_drop=0.2),  # see CaptionerConfig.memory_detail
    "gpu": dict(vision=dict(image_size=128, patch_size=8, width=384, depth=8, heads=6),
                text=dict(width=384, depth=6, heads=6, decoder_self_attention=True), embed_dim=256, memory_layer=-2),
}


@dataclass
class CaptionerConfig:
    vision: ViTConfig = field(default_factory=ViTConfig)  # the image encoder
    text: BertTextConfig = field(default_factory=BertTextConfig)  # the shared text transformer
    vocab_size: int = WORLD_VOCAB  # the tokenizer's ids; the text embedding has [ENC] and [DEC] rows after them
    embed_dim: int = 64  # width of the ITC space (BLIP: 256)
    temperature_init: float = 0.07  # ITC temperature at the start; learned, clamped to [0.001, 0.5] as BLIP does
    label_smoothing: float = 0.1  # LM targets: 0.9 on the next token, 0.1 spread over the vocabulary
    objectives: tuple[str, ...] = OBJECTIVES  # which losses `loss` sums ("lm" alone is the ablation)
    matching_weight: float = 1.0  # ITC and ITM each enter the total with this weight (BLIP: 1)
    # whether ITC and ITM train the image encoder too (BLIP: yes); False detaches the image tokens they read,
    # so only the LM shapes the vision tower and the matching losses train the text side and projections.
    # The cpu preset detaches: its text side starts random, and early ITC/ITM gradients through the
    # CLIP tower at the captioner's lr wreck it (800 steps: 30% exact scenes, 59% detached, LM alone 71%)
    matching_trains_vision: bool = True
    itm_rows: int | None = None  # ITM judges this many rows of a batch (+ 2 hard negatives each); None = all.
    #                              ITM runs the cross-attending text stack on 3 sequences per row: the costliest part
    # which ViT hidden state the text cross-attends to: -1 = the last block's output after ln_post
    # (BLIP's); -2 = the last block's input, through its own LayerNorm (ln_memory). CLIP trained its
    # last block on the class token alone, so its patch outputs there never got a signal; the
    # class token (ITC) is always the last block's, computed for that one token as CLIP does
    memory_layer: int = -1
    # each patch of that memory plus a projection of its 3x3 neighbourhood of first-layer patch embeddings (grounding's
    # box_detail): the pixel detail a shape is told by, which the late layers blur. memory_detail_drop: in training,
    # each image's whole detail path is off with this probability, so the decoder keeps reading CLIP's tokens too.
    # Measured on the cpu recipe (2,400 steps, 1,000 test scenes, beam 3; without / drop 0 / 0.2 / 0.5): exact scenes
    # 92.4 / 96.3 / 96.2 / 94.7% (4 objects 79.8 / 89.5 / 88.7 / 87.5%), every claim true 90.6 / 95.4 / 95.3 / 93.1%,
    # CHAIR 2.1 / 1.6 / 1.4 / 1.9%, held-out scenes 71.6 / 52.6 / 64.8 / 76.4%: read from the pixels alone, a
    # never-seen pair is named as a seen one; with the drop the names stay composed from CLIP's features
    memory_detail: bool = False
    memory_detail_drop: float = 0.0
    prompt: str = "a picture of"  # BLIP's captioning prompt: prefixed in training and generation, never scored
    pad_id: int = IDS["pad_id"]  # the tokenizer's <|pad|>
    bos_id: int = IDS["bos_id"]  # the tokenizer's <|bos|>: BLIP's [CLS], the ITC text summary
    eos_id: int = IDS["eos_id"]  # the tokenizer's <|eos|>: BLIP's [SEP], where a caption ends
    enc_id: int = IDS["enc_id"]  # [ENC]: first token in ITM mode (a new id past the tokenizer's)
    dec_id: int = IDS["dec_id"]  # [DEC]: first token in LM mode

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = ViTConfig(**self.vision)
        if isinstance(self.text, dict):
            self.text = BertTextConfig(**self.text)
        if not isinstance(self.vision, ViTConfig) or not isinstance(self.text, BertTextConfig):
            raise TypeError("CaptionerConfig.vision/text must be a ViTConfig/BertTextConfig (or dict)")
        validate.positive_int("CaptionerConfig.embed_dim", self.embed_dim)
        if validate.positive_int("CaptionerConfig.vocab_size", self.vocab_size) > self.text.vocab_size:
            raise ValueError(f"vocab_size ({self.vocab_size}) must be <= text.vocab_size ({self.text.vocab_size})")
        self.temperature_init = validate.real("temperature_init", self.temperature_init, 0.001, 0.5)
        self.label_smoothing = validate.real("label_smoothing", self.label_smoothing, 0.0, 1.0, high_open=True)
        self.matching_weight = validate.real("matching_weight", self.matching_weight, 0.0)
        validate.boolean("CaptionerConfig.matching_trains_vision", self.matching_trains_vision)
        validate.boolean("CaptionerConfig.memory_detail", self.memory_detail)
        self.memory_detail_drop = validate.real("memory_detail_drop", self.memory_detail_drop, 0.0, 1.0, high_open=True)
        self.objectives = tuple(self.objectives)
        if self.itm_rows is not None:
            validate.positive_int("CaptionerConfig.itm_rows", self.itm_rows)
        if not self.objectives or any(o not in OBJECTIVES for o in self.objectives):
            raise ValueError(f"objectives must be a non-empty subset of {OBJECTIVES}, got {self.objectives}")
        if self.text.memory_dim != self.vision.width:
            raise ValueError(f"text.memory_dim ({self.text.memory_dim}) must equal vision.width ({self.vision.width})")
        for f in ("pad_id", "bos_id", "eos_id", "enc_id", "dec_id"):
            validate.vocab_id(f"CaptionerConfig.{f}", getattr(self, f), self.text.vocab_size, optional=False)
        if isinstance(self.memory_layer, bool) or not isinstance(self.memory_layer, int) or not (
                -self.vision.depth - 1 <= self.memory_layer <= -1):
            raise ValueError(f"memory_layer must be an int in [-{self.vision.depth + 1}, -1] (a ViT hidden state "
                             f"counted from the end), got {self.memory_layer!r}")
        if not isinstance(self.prompt, str):
            raise TypeError(f"prompt must be a str, got {type(self.prompt).__name__}")
        # generate() reads its defaults from the decoder's config
        self.text.pad_id, self.text.eos_id = self.pad_id, self.eos_id

    @classmethod
    def preset(cls, name: str, **overrides) -> "CaptionerConfig":
        """A named preset; `vision=` / `text=` overrides are dicts merged into the preset's."""
        if name not in PRESETS:
            raise ValueError(f"unknown captioner preset {name!r}; choose from {sorted(PRESETS)}")
        p = {**PRESETS[name]}
        vision = {**p.pop("vision"), **overrides.pop("vision", {})}
        text = {"vocab_size": WORLD_VOCAB + 2, "context_length": 40, "memory_dim": vision["width"],
                **p.pop("text"), **overrides.pop("text", {})}
        return cls(vision=ViTConfig(**vision), text=BertTextConfig(**text), **{**p, **overrides})


def check_pixels(pixel_values, image_size: int) -> torch.Tensor:
    """(B >= 1, 3, S, S) float images in [-1, 1], or a ValueError naming what was expected and what came."""
    if not isinstance(pixel_values, torch.Tensor):
        raise ValueError(f"pixel_values must be a float tensor (B, 3, {image_size}, {image_size}), got "
                         f"{type(pixel_values).__name__} (use captioner.Processor / minivl.clip.Preprocess)")
    if not pixel_values.is_floating_point():
        raise ValueError(f"pixel_values must be float in [-1, 1], got dtype {pixel_values.dtype} "
                         "(uint8 pixels? use captioner.Processor)")
    if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, image_size, image_size):
        raise ValueError(f"pixel_values must be (B, 3, {image_size}, {image_size}), got {tuple(pixel_values.shape)} "
                         "(Processor resizes images of another size)")
    if pixel_values.shape[0] == 0:
        raise ValueError("pixel_values is an empty batch (B = 0): pass at least one image")
    return check_images(pixel_values, image_size)


class Captioner(Checkpointable, nn.Module):
    """Images (B, 3, H, W) -> captions (`generate`), match scores (`itm_score`), similarities (`similarity`)."""

    config_class = CaptionerConfig

    def __init__(self, config: CaptionerConfig) -> None:
        super().__init__()
        self.config = c = config
        self.vision = VisionTransformer(c.vision)
        self.text = BertText(c.text)
        self.vision_proj = nn.Linear(c.vision.width, c.embed_dim)
        self.text_proj = nn.Linear(c.text.width, c.embed_dim)
        self.itm_head = nn.Linear(c.text.width, 2)
        self.temp = nn.Parameter(torch.tensor(c.temperature_init))
        self.ln_memory = nn.LayerNorm(c.vision.width, eps=c.vision.norm_eps) if c.memory_layer != -1 else None
        self.memory_detail = None  # built last, so that with the option off every other weight starts as before
        if c.memory_detail:
            self.memory_detail = nn.Linear(9 * c.vision.width, c.vision.width)  # 3x3 first-layer patches -> Dv
            nn.init.normal_(self.memory_detail.weight, std=(9 * c.vision.width) ** -0.5)  # fan-in: ~unit outputs
            nn.init.zeros_(self.memory_detail.bias)
        self.tokenizer = None  # set by `load` to the checkpoint's tokenizer; the world BPE otherwise

    # ------------------------------------------------------------------ the three modes
    def encode_image(self, pixel_values: torch.Tensor, pooled: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 3, H, W) -> (memory (B, 1 + N, Dv): what the text cross-attends to, the class token
        (B, Dv) after ln_post: the image's ITC summary, or None when not `pooled`).

        With memory_layer = -1 both come from the last block's output (BLIP). Otherwise the memory is
        hidden state `memory_layer` through ln_memory, and the blocks after it run for the class
        token alone (`Block(query_index=0)`, CLIP's pooled path), or not at all when not pooled."""
        c, v = self.config, self.vision
        pixel_values = check_pixels(pixel_values, c.vision.image_size)
        detail = self.memory_detail is not None
        if c.memory_layer == -1:
            out = v(pixel_values, output_hidden_states=detail)
            tokens = out.tokens  # (B, 1 + N, Dv)
            return self._with_detail(tokens, out.hidden_states[0] if detail else None), tokens[:, 0]
        blocks = list(v.transformer.blocks)
        first = v.ln_pre(v.embed(pixel_values))  # (B, 1 + N, Dv): hidden state 0, computed once for both paths
        x = v.hidden_state(pixel_values, c.memory_layer, first=first)  # (B, 1 + N, Dv)
        memory, cls = self._with_detail(self.ln_memory(x), first), None
        if pooled:
            for block in blocks[len(blocks) + 1 + c.memory_layer:-1]:
                x, _ = block(x)
            cls = v.ln_post(blocks[-1](x, query_index=0)[0][:, 0])  # (B, Dv)
        return memory, cls

    def _with_detail(self, memory: torch.Tensor, first: torch.Tensor | None) -> torch.Tensor:
        """config.memory_detail: memory (B, 1 + N, Dv) with each patch plus GELU(Linear(its 3x3 neighbourhood of
        first-layer patch embeddings)), `first` being the tower's hidden state 0 (B, 1 + N, Dv); in training
        dropped per image with config.memory_detail_drop; the class token as it was. Otherwise the memory unchanged."""
        if self.memory_detail is None:
            return memory
        detail = F.gelu(self.memory_detail(neighbourhood(first[:, 1:], self.config.vision.grid)))  # (B, N, Dv)
        p = self.config.memory_detail_drop
        if self.training and p > 0:  # per image, the whole path off with probability p (no rescale: on is on)
            keep = torch.rand(detail.shape[0], 1, 1, device=detail.device) >= p  # (B, 1, 1)
            detail = detail * keep.to(detail.dtype)
        return torch.cat([memory[:, :1], memory[:, 1:] + detail], 1)

    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> image tokens (B, 1 + N, Dv): what the text cross-attends to."""
        return self.encode_image(pixel_values, pooled=False)[0]

    def temperature(self) -> torch.Tensor:
        return self.temp.clamp(0.001, 0.5)

    def image_features(self, pooled: torch.Tensor) -> torch.Tensor:
        """The class token (B, Dv) -> unit ITC vectors (B, E)."""
        return F.normalize(self.vision_proj(pooled).float(), dim=-1)  # (B, E)

    def text_features(self, input_ids, attention_mask=None) -> torch.Tensor:
        """Unimodal encoder: ids starting with bos ([CLS]) -> unit vectors (B, E)."""
        return F.normalize(self.text_proj(self.text.encode(input_ids, attention_mask)[:, 0]).float(), dim=-1)

    def itm_logits(self, tokens, input_ids, attention_mask=None) -> torch.Tensor:
        """Image-grounded encoder: (no match, match) logits (B, 2) read at the first token.
        `itm_score` puts [ENC] there; given ids are used as they are (the transformers convention)."""
        h = self.text.encode(input_ids, attention_mask, memory=tokens)  # (B, T, D)
        return self.itm_head(h[:, 0])  # (B, 2)

    def forward(self, pixel_values, input_ids, attention_mask=None) -> torch.Tensor:
        """LM logits (B, T, V) of input_ids (first token [DEC]) given the images, as
        `BlipForConditionalGeneration(pixel_values, input_ids).logits`."""
        return self.text(input_ids, attention_mask, memory=self.image_tokens(pixel_values))

    # ------------------------------------------------------------------ training
    def prompt_ids(self) -> list[int]:
        return self._tokenizer().encode(self.config.prompt) if self.config.prompt else []

    def _tokenizer(self):
        if self.tokenizer is None:
            from minivl.data import world_tokenizer
            self.tokenizer = world_tokenizer()
        return self.tokenizer

    def lm_inputs(self, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Captions bos ... eos (B, T) -> ([DEC] prompt caption eos, its mask, labels with -100 at the
        [DEC], prompt and pad positions), each (B, 1 + P + T - 1)."""
        B = input_ids.shape[0]
        head = torch.tensor([self.config.dec_id, *self.prompt_ids()], device=input_ids.device)
        ids = torch.cat([head.expand(B, -1), input_ids[:, 1:]], 1)  # (B, 1 + P + T - 1): bos -> [DEC] prompt
        mask = torch.cat([torch.ones(B, len(head), dtype=attention_mask.dtype, device=ids.device),
                          attention_mask[:, 1:]], 1)
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :len(head)] = -100  # the prompt is given, not predicted
        return ids, mask, labels

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """ITC + ITM + LM (config.objectives) on batch{image, input_ids, attention_mask[, positives]}.

        input_ids are the tokenizer's bos ... eos, right-padded; positives (B, B) bool marks caption j
        as also true of image i (Shapes World repeats captions): neither an ITC target to push away
        nor an ITM negative."""
        if not isinstance(batch, dict) or "image" not in batch or "input_ids" not in batch:
            raise TypeError(f"Captioner.loss needs a dict with 'image', 'input_ids' (and 'attention_mask'), got "
                            f"{sorted(batch) if isinstance(batch, dict) else type(batch).__name__}")
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        objectives, logs, total = self.config.objectives, {}, 0.0
        tokens, cls = self.encode_image(batch["image"], pooled="itc" in objectives or "itm" in objectives)
        B = tokens.shape[0]
        if ids.shape[0] != B:
            raise ValueError(f"one caption per image: {B} images, {ids.shape[0]} captions")
        pos = batch.get("positives")
        pos = torch.eye(B, dtype=torch.bool, device=tokens.device) if pos is None else pos.to(tokens.device).bool()
        w = self.config.matching_weight
        if "itc" in objectives or "itm" in objectives:
            seen, cls = (tokens, cls) if self.config.matching_trains_vision else (tokens.detach(), cls.detach())
            img_f, txt_f = self.image_features(cls), self.text_features(ids, mask)
            if "itc" in objectives:
                logs["itc"] = clip_loss(img_f, txt_f, temperature=self.temperature(), positives=pos)
                total = total + w * logs["itc"]
        if "itm" in objectives:
            logs["itm"], logs["itm_acc"] = self._itm_loss(seen, ids, mask, img_f, txt_f, pos)
            total = total + w * logs["itm"]
        if "lm" in objectives:
            lm_ids, lm_mask, labels = self.lm_inputs(ids, mask)
            logits = self.text(lm_ids, lm_mask, memory=tokens)  # (B, L, V)
            logs["lm"] = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                         ignore_index=-100, label_smoothing=self.config.label_smoothing)
            total = total + logs["lm"]
        logs = {k: v.detach() for k, v in logs.items()}
        logs["temp"] = self.temperature().detach()
        return total, logs

    def _itm_loss(self, tokens, ids, mask, img_f, txt_f, pos):
        """Binary match loss on B true pairs and 2B hard negatives mined from the ITC similarities."""
        R = tokens.shape[0] if self.config.itm_rows is None else min(self.config.itm_rows, tokens.shape[0])
        with torch.no_grad():
            neg_text, neg_image = hard_negatives(img_f @ txt_f.T / self.temperature(), pos, rows=R)
        all_tokens, all_mask = tokens, mask
        all_enc = ids.clone()
        all_enc[:, 0] = self.config.enc_id  # [ENC] in place of [CLS]: the matching mode's own summary token
        tokens, enc, mask, B = tokens[:R], all_enc[:R], mask[:R], R  # the rows judged; negatives from the whole batch
        memory = torch.cat([tokens, tokens, all_tokens[neg_image]])  # (3R, 1 + N, Dv)
        logits = self.itm_logits(memory, torch.cat([enc, all_enc[neg_text], enc]),
                                 torch.cat([mask, all_mask[neg_text], mask]))  # (3R, 2)
        labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(logits.device)
        loss = F.cross_entropy(logits.float(), labels)
        return loss, (logits.argmax(-1) == labels).float().mean()

    # ------------------------------------------------------------------ inference
    def _texts(self, texts, first_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Strings (or a tokenizer dict) -> ids bos ... eos (B, T) with the first id replaced, and mask."""
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(texts, dict):
            ids, mask = texts["input_ids"], texts.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask
        elif isinstance(texts, (list, tuple)) and texts and all(isinstance(t, str) for t in texts):
            enc = self._tokenizer()(list(texts), context_length=self.config.text.context_length, padding="longest")
            ids, mask = enc["input_ids"], enc["attention_mask"]
        else:
            raise TypeError(f"texts must be a str, a non-empty list of str or a dict of input_ids, got "
                            f"{type(texts).__name__}")
        ids = ids.to(self.temp.device).clone()
        if first_id is not None:
            ids[:, 0] = first_id
        return ids, mask.to(ids.device)

    @torch.no_grad()
    def itm_score(self, image, text) -> torch.Tensor:
        """P(image i matches text i) (B,), from the ITM head (one text per image; a single text is shared)."""
        tokens = self.image_tokens(image)
        ids, mask = self._texts(text, self.config.enc_id)
        if ids.shape[0] == 1 and tokens.shape[0] > 1:
            ids, mask = ids.expand(tokens.shape[0], -1), mask.expand(tokens.shape[0], -1)
        if ids.shape[0] != tokens.shape[0]:
            raise ValueError(f"itm_score pairs image i with text i: got {tokens.shape[0]} images, {ids.shape[0]} texts")
        return self.itm_logits(tokens, ids, mask).float().softmax(-1)[:, 1]

    @torch.no_grad()
    def similarity(self, images, texts) -> torch.Tensor:
        """ITC cosine similarities (B_img, B_txt), as CLIP's (before the temperature)."""
        img_f = self.image_features(self.encode_image(images)[1])
        ids, mask = self._texts(texts, self.config.bos_id)
        return img_f @ self.text_features(ids, mask).T

    @torch.no_grad()
    def generate(self, pixel_values, input_ids=None, attention_mask=None, *, prompt: str | None = None,
                 max_new_tokens: int = 20, min_new_tokens: int = 0, num_beams: int = 1, **kwargs) -> torch.Tensor:
        """Caption token ids (B, T_new) after the prompt: decode with `Processor.batch_decode`.

        The prompt is [DEC] + `prompt` (default config.prompt, "a picture of"), or `input_ids` given
        (their first token is set to [DEC], as transformers' BLIP does); the prompt is not part of
        the output, so the decoded text is the caption alone. Greedy by default; num_beams, do_sample,
        top_p, top_k, temperature, repetition_penalty, length_penalty go to `minivl.generation.generate`
        (BLIP's demo: num_beams=3, max length 20, min length 5). Batched: one caption per image.
        """
        tokens = self.image_tokens(pixel_values)  # (B, 1 + N, Dv)
        B = tokens.shape[0]
        if input_ids is None:
            text = self.config.prompt if prompt is None else prompt
            head = [self.config.dec_id, *(self._tokenizer().encode(text) if text else [])]
            input_ids = torch.tensor([head], device=tokens.device).expand(B, -1)
        else:
            input_ids = validate.tensor("input_ids", input_ids, dims=2, kind="int").to(tokens.device).clone()
            input_ids[:, 0] = self.config.dec_id
        if input_ids.shape[1] > self.config.text.context_length:
            raise ValueError(f"the prompt has {input_ids.shape[1]} tokens, more than the context length "
                             f"{self.config.text.context_length}")
        return generation.generate(self.text, input_ids, attention_mask, memory=tokens, max_new_tokens=max_new_tokens,
                                   min_new_tokens=min_new_tokens, num_beams=num_beams, **kwargs)

    @torch.no_grad()
    def caption(self, pixel_values, *, num_beams: int = 3, max_new_tokens: int = 32, **kwargs) -> list[str]:
        """Caption strings, beam search with BLIP's 3 beams by default. (BLIP's demo also caps the length
        at 20 tokens with 5 at least, counting the prompt: a Shapes World list of four sized objects
        needs about 20 tokens after the prompt, hence 32 here.)"""
        return self.decode(self.generate(pixel_values, num_beams=num_beams, max_new_tokens=max_new_tokens, **kwargs))

    def decode(self, ids) -> list[str]:
        """Token ids (B, T) -> strings, special tokens dropped (`Processor.batch_decode`)."""
        return decode(self._tokenizer(), ids)

    @torch.no_grad()
    def cross_attention_maps(self, pixel_values, ids: torch.Tensor) -> torch.Tensor:
        """Where each caption token looked: (B, layers, T, grid, grid), heads averaged, class token dropped.

        ids: [DEC] prompt caption (what `lm_inputs` or generate's prompt + output make)."""
        tokens = self.image_tokens(pixel_values)
        _, out = self.text(ids, memory=tokens, need_weights=True)
        w = torch.stack(out.cross_attentions, 1).mean(2)  # (B, L, T, 1 + N)
        g = self.config.vision.grid
        return w[..., 1:].reshape(*w.shape[:3], g, g)  # (B, L, T, grid, grid)


@torch.no_grad()
def hard_negatives(sim: torch.Tensor, positives: torch.Tensor, generator: torch.Generator | None = None,
                   rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP's hard-negative mining from ITC logits sim (B, B): for each image a caption, for each caption
    an image, drawn with probability softmax(sim) over the pairs that are *not* positives -> ((R,), (R,))
    for the first R = rows (default B) images and captions, drawn from the whole batch.

    A row whose every pair is a positive falls back to any other row (it then may be a false negative)."""
    B = sim.shape[0]
    R = B if rows is None else min(rows, B)
    if B < 2:
        raise ValueError("ITM mines its negatives from the other rows of the batch: use a batch of >= 2")
    w_i2t = sim[:R].float().softmax(1).masked_fill(positives[:R], 0)  # (R, B): a positive is never drawn
    w_t2i = sim[:, :R].float().T.softmax(1).masked_fill(positives[:, :R].T, 0)  # (R, B)
    off_diag = ~torch.eye(R, B, dtype=torch.bool, device=sim.device)
    for w in (w_i2t, w_t2i):
        empty = w.sum(1) <= 0
        w[empty] = off_diag[empty].float()
    return (torch.multinomial(w_i2t, 1, generator=generator)[:, 0],  # (B,) a confusable caption per image
            torch.multinomial(w_t2i, 1, generator=generator)[:, 0])  # (B,) a confusable image per caption


def decode(tokenizer, ids) -> list[str]:
    """Token ids (B, T) -> caption strings: special tokens, [ENC]/[DEC] and padding dropped."""
    V = tokenizer.vocab_size
    return [tokenizer.decode([i for i in row if i < V], skip_special_tokens=True).strip()
            for row in torch.as_tensor(ids).tolist()]


__all__ = ["Captioner", "CaptionerConfig", "PRESETS", "IDS", "OBJECTIVES", "check_pixels", "decode", "hard_negatives"]
