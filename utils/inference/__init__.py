"""The public Python API: ``from utils.inference import TrainedVAE``."""

from utils.inference.trained import TrainedVAE

__all__ = ["TrainedVAE"]
