"""Running a bundle on camera frames: from uint8 RGB images to the outputs a robot publishes."""
from .predictor import OUTPUT_KINDS, FrameOutputs, Predictor, PredictorOptions

__all__ = ["OUTPUT_KINDS", "FrameOutputs", "Predictor", "PredictorOptions"]
