"""albumentations without its import-time update check.

On import, albumentations asks PyPI whether a newer version exists: a network call (2 s timeout and a
warning on offline machines such as cluster nodes) that a training run should not make. Importing it through
this module turns the check off unless the user set ``NO_ALBUMENTATIONS_UPDATE`` already.
"""

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A

__all__ = ["A"]
