"""Evaluation metrics, written from scratch and tested equal to the implementations the field uses.

Every later notebook reports one of these numbers, and learners compare them with papers, so each
is the standard definition (the formula is in each function's docstring):

    retrieval       recall@K (image->text, text->image), median / mean rank     [VSE++, CLIP]
    classification  top-k accuracy, confusion matrix                             [ImageNet]
    captioning      corpus BLEU-1..4, CIDEr-D           == pycocoevalcap's Bleu and Cider
    caption_truth   is a caption true of its scene: object precision/recall, exact scene, CHAIR
    vqa             VQA accuracy (10 annotators), exact match, per-type breakdown [VQA eval]
    boxes           xyxy/xywh/cxcywh, IoU, GIoU, referring accuracy@0.5          [RefCOCO]
    detection       AP per class, mAP@0.5, mAP@[.5:.95]  == pycocotools' COCOeval (bbox)

The one idea: a metric is part of the experiment. "BLEU-4" with another brevity penalty or
"mAP" with 11-point interpolation are different numbers, so each function here matches the
reference implementation, documents the quirks it reproduces, and is checked against it in
tests/test_metrics.py. Bad inputs (wrong shape or type, NaN/inf, inverted boxes, empty where no
number is meaningful, k out of range) raise ValueError or TypeError naming the argument, checked
once where they enter (metrics/_checks.py); edge cases have documented values (never NaN).
"""
from minivl.metrics.boxes import (box_area, box_convert, box_iou, generalized_box_iou,
                                  referring_accuracy)
from minivl.metrics.caption_truth import caption_truth, parse_caption, scene_truth
from minivl.metrics.captioning import bleu, cider_d, cider_d_scores, tokenize_caption
from minivl.metrics.classification import confusion_matrix, topk_accuracy
from minivl.metrics.detection import COCO_IOU_THRESHOLDS, average_precision
from minivl.metrics.retrieval import first_positive_rank, retrieval_metrics
from minivl.metrics.vqa import (accuracy_by_type, exact_match, normalize_answer, vqa_accuracy,
                                vqa_scores)

__all__ = [
    "retrieval_metrics", "first_positive_rank",
    "topk_accuracy", "confusion_matrix",
    "bleu", "cider_d", "cider_d_scores", "tokenize_caption",
    "caption_truth", "scene_truth", "parse_caption",
    "vqa_accuracy", "vqa_scores", "exact_match", "accuracy_by_type", "normalize_answer",
    "box_convert", "box_area", "box_iou", "generalized_box_iou", "referring_accuracy",
    "average_precision", "COCO_IOU_THRESHOLDS",
]
