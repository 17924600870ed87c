"""MAML engine: Modality-aware Mutual Learning for multi-phase liver tumor segmentation.

Pure Python (torch, numpy, SimpleITK, itk-elastix, MONAI); nothing here imports Slicer or Qt.
"""

__version__ = "0.1.0"
