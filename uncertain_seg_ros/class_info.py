"""What the node's outputs mean, as one JSON document: class names and colours, the uncertainty and mask.

The labels image carries class indices and the colour images carry a palette; neither says which
index or colour is which class. The node latches this document beside each camera's outputs
(``<ns>/segmentation/class_info``, ``std_msgs/String``) so that RViz users (``ros2 topic echo``)
and programs read the legend from the node that made the images rather than from a copy of the
bundle. It is a ``String`` rather than ``vision_msgs/LabelInfo`` because LabelInfo carries no
colours and no uncertainty description, and vision_msgs has no wheel for a pip-installed Jazzy.
"""
from .bundle import BundleConfig

FORMAT = 1


def class_info(config: BundleConfig, model_id: str, mask_threshold: float, colormap: str, labels_encoding: str,
               mark_color: tuple[int, int, int], marking: str) -> dict:
    """The legend of the outputs of a model with ``config`` as the node currently publishes them."""
    return {
        "format": FORMAT,
        "model": {"name": config.name, "id": model_id},
        "labels": {"encoding": labels_encoding, "ignore_index": config.ignore_index},
        "classes": [{"id": c.id, "name": c.name, "color": list(c.color)} for c in config.classes],
        "uncertainty": {"source": config.uncertainty_source, "encoding": "32FC1", "range": [0.0, 1.0],
                        "meaning": "higher = more likely wrong", "colormap": colormap},
        "mask": {"encoding": "mono8", "threshold": mask_threshold, "on": 255,
                 "meaning": "uncertainty above the threshold: the label is likely wrong"},
        "overlay": {"mark_color": list(mark_color), "marking": marking},
    }

