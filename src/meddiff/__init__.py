"""meddiff: hierarchical multimodal diffusion models for robust, explainable medical diagnosis.

Importing the package is cheap: heavy dependencies (torch, MONAI, MLflow, great-expectations) are
imported by the stage modules that need them, never here.
"""

__version__ = "0.1.0"

MODALITIES: tuple[str, ...] = ("image", "text", "tabular")
