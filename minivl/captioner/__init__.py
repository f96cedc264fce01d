"""BLIP (Li et al., 2022), the captioning family: the public API a notebook imports.

    from minivl import captioner
    model, processor = captioner.load("captioner-cpu")
    ids = model.generate(processor(images=image)["pixel_values"], num_beams=3)
    processor.batch_decode(ids, skip_special_tokens=True)      # ["a small red circle and ..."]
    model.itm_score(pixel_values, "a red circle"), model.similarity(pixel_values, texts)

The package's files, one concept each:
- `text.py`      the BERT-style text transformer: unimodal encoder, image-grounded encoder, decoder
- `model.py`     config + presets, the Captioner, its three losses, generation, ITM and ITC scores
- `processor.py` images -> pixels, ids -> captions; `load`
- `data.py`      your own data: COCO-captions JSON + an image folder, or an in-memory list
- `eval.py`      BLEU / CIDEr-D, caption truth against the scene graph, ITM accuracy, ITC recall@K
- `convert.py`   the `transformers` BLIP port (imported on demand: it needs `transformers` to run)

The one idea to take away: one text transformer, three masks and three losses - it learns to
judge a caption (ITC, ITM) and to write one (LM), and the judging makes the writing truer.
"""
from minivl.captioner.model import (IDS, OBJECTIVES, PRESETS, Captioner, CaptionerConfig, check_pixels, decode,
                                    hard_negatives)
from minivl.captioner.processor import Processor, load
from minivl.captioner.text import BertText, BertTextConfig

__all__ = ["Captioner", "CaptionerConfig", "PRESETS", "IDS", "OBJECTIVES", "BertText", "BertTextConfig",
           "Processor", "load", "check_pixels", "decode", "hard_negatives"]
