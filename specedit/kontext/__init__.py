"""The FLUX.1-Kontext family: the editor adapter, its cost model, the end-to-end pipeline, its family record."""

from specedit.families import register
from specedit.kontext.editor import KontextCosts, KontextEditor
from specedit.kontext.family import FAMILY
from specedit.kontext.pipeline import KontextPipeline

register(FAMILY)

__all__ = ["FAMILY", "KontextCosts", "KontextEditor", "KontextPipeline"]
