"""The Qwen-Image-Edit family (Edit, Edit-2509, Edit-2511): the editor adapter, its cost model, the pipeline."""

from specedit.qwen.editor import QwenCosts, QwenEditor

__all__ = ["QwenCosts", "QwenEditor"]
