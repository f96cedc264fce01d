"""ViLT-style visual question answering: one transformer reads the question and the image.

Public API: `ViltConfig`, `ViltForQuestionAnswering` (the model), `ViltProcessor` (images +
questions -> input_ids, attention_mask, pixel_values), the data helpers (records, answer
vocabulary, soft scores, VQA v2 files), evaluation per question type, the late-fusion baseline,
and `convert.from_transformers` (port a `transformers` ViltForQuestionAnswering).
"""
from minivl.vqa.model import PRESETS, ViltConfig, ViltForQuestionAnswering, VQAOutput, vqa_loss
from minivl.vqa.data import Packer, answer_vocabulary, check_records, load_image, load_vqa_v2, patch_labels, soft_scores
from minivl.vqa.eval import (QUESTION_TYPES, count_confusion, evaluate, predict_scenes, records_to_scenes, score,
                             world_scenes)

__all__ = ["PRESETS", "ViltConfig", "ViltForQuestionAnswering", "VQAOutput", "vqa_loss", "Packer",
           "answer_vocabulary", "check_records", "load_image", "load_vqa_v2", "patch_labels", "soft_scores", "QUESTION_TYPES",
           "count_confusion", "evaluate", "predict_scenes", "records_to_scenes", "score", "world_scenes"]
