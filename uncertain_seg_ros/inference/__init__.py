"""Running a bundle on camera frames: from uint8 RGB images to the outputs a robot publishes."""
from .artifact_cache import ArtifactCache, ArtifactKey, default_cache_dir
from .backend import PRECISIONS, BackendUnavailable
from .factory import BACKENDS, available_backends, choose_backend, create_backend
from .predictor import OUTPUT_KINDS, FrameOutputs, Predictor, PredictorOptions

__all__ = [
    "ArtifactCache", "ArtifactKey", "default_cache_dir", "BACKENDS", "PRECISIONS", "BackendUnavailable",
    "available_backends", "choose_backend", "create_backend", "OUTPUT_KINDS", "FrameOutputs", "Predictor",
    "PredictorOptions",
]
