"""Evaluation: COCO metrics through the official pycocotools COCOeval."""

from instseg.evaluation.coco import METRIC_NAMES, detections_to_coco, evaluate_coco, format_summary, write_results_json

__all__ = ["METRIC_NAMES", "detections_to_coco", "evaluate_coco", "format_summary", "write_results_json"]
