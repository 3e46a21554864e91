"""The Qwen-Image-Edit family (Edit, Edit-2509, Edit-2511): the adapter, its cost model, the pipeline, its record."""

from specedit.families import register
from specedit.qwen.editor import QwenCosts, QwenEditor
from specedit.qwen.family import FAMILY
from specedit.qwen.pipeline import QwenEditPipeline

register(FAMILY)

__all__ = ["FAMILY", "QwenCosts", "QwenEditor", "QwenEditPipeline"]
