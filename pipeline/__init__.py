"""das-pipeline: training-data attribution for diffusion models (DAS, D-TRAK, TRAK)."""

__version__ = "0.1.0"
