"""Grounding and open-vocabulary detection: OWL-ViT (Minderer et al., 2022) on minivl's CLIP towers,
behind the calls users know from Grounding DINO (Liu et al., 2023) and transformers.

    from minivl import grounding
    model = grounding.OWLViT.load("data/checkpoints/grounding-cpu")
    boxes, logits, phrases = grounding.predict(model, scene.image, "circle . red square")   # normalised cxcywh
    results = grounding.post_process_object_detection(model(images, **model.tokenize(["circle"])),
                                                      threshold=0.1, target_sizes=[(64, 64)])  # absolute xyxy
    box, score = grounding.ground(model, scene.image, "the object left of the red circle")    # absolute xyxy

The package's files, one concept each:
- `model.py`   the config, the patch x class-token merge, the box head over a grid bias (reading the first
               layer's 3x3 neighbourhood too, `box_detail`), the class head
- `targets.py` training queries and targets from Shapes World's scene graph
- `matcher.py` Hungarian matching (scipy) with class, L1 and GIoU costs
- `loss.py`    sigmoid focal loss + L1 + GIoU on the matched pairs
- `fusion.py`  an optional Grounding-DINO-style enhancer: patches read the referring expression first
- `predict.py` predict / annotate / post_process_object_detection / ground / image-guided queries
- `eval.py`    COCO AP for shape and colour-shape queries (seen vs held-out pairs), referring accuracy,
               box tightness (IoU of the top box per object), the precision-recall curve
- `convert.py` the `transformers` OwlViTForObjectDetection port (imported on demand)

The one idea to take away: detection is classification of patches against text plus a box per
patch, so the vocabulary is whatever the text tower can embed - including pairs never boxed in training.
"""
from minivl.grounding.eval import (box_tightness, detection_eval, evaluate, heldout_names, precision_recall_curve,
                                   referring_eval)
from minivl.grounding.loss import set_loss, sigmoid_focal_loss
from minivl.grounding.matcher import hungarian_match, match_cost
from minivl.grounding.model import OWLViT, PRESETS, OWLViTConfig, OWLViTOutput, box_bias
from minivl.grounding.predict import (annotate, as_images, ground, image_guided_detection, image_query_embedding,
                                      post_process_object_detection, predict, split_caption)
from minivl.grounding.targets import make_batch, parse_phrase

__all__ = ["OWLViT", "OWLViTConfig", "OWLViTOutput", "PRESETS", "box_bias", "set_loss", "sigmoid_focal_loss",
           "hungarian_match", "match_cost", "predict", "annotate", "post_process_object_detection", "ground",
           "image_guided_detection", "image_query_embedding", "split_caption", "as_images", "make_batch", "parse_phrase",
           "detection_eval", "referring_eval", "box_tightness", "precision_recall_curve", "evaluate", "heldout_names"]
