"""The toy editor: synthetic paired edits, a small Kontext-architecture editor trained here, demo and eval.

Importing the package registers the "toy" family (``specedit.toy.family``).
"""

from specedit.families import register
from specedit.toy.family import FAMILY

register(FAMILY)
