"""Evaluation of segmentations: metrics, folders of label maps, a model on a data set, and choosing
post-processing on validation cases.

Layering: :mod:`.metrics` imports no other ``maml`` module; the rest may use the runtime (inference,
post-processing, I/O), but nothing in the runtime imports this package at module level
(Testing/test_layering.py checks both).
"""

from .folders import (IMAGE_SUFFIXES, case_name, evaluate_folders, evaluate_images, label_files,
                      parse_labels, read_label_image)
from .metrics import (DEFINITIONS, METRICS, SIZE_BINS_ML, dice_score,
                      evaluate_arrays, label_metrics, lesion_metrics, mask_edges,
                      monai_surface_available, size_bin, summarize, summarize_lesions, surface_metrics)
from .model import evaluate_model, write_model_results
from .results import EvaluationResult, write_results

__all__ = [
    "DEFINITIONS", "METRICS", "SIZE_BINS_ML", "EvaluationResult", "IMAGE_SUFFIXES", "case_name",
    "dice_score", "evaluate_arrays", "evaluate_folders", "evaluate_images", "evaluate_model",
    "label_files", "label_metrics", "lesion_metrics", "mask_edges", "monai_surface_available",
    "parse_labels", "read_label_image", "size_bin", "summarize", "summarize_lesions",
    "surface_metrics", "write_model_results", "write_results",
]
