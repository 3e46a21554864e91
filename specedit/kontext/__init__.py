"""The FLUX.1-Kontext family: the editor adapter, its cost model, the end-to-end pipeline."""

from specedit.kontext.editor import KontextCosts, KontextEditor

__all__ = ["KontextCosts", "KontextEditor"]
