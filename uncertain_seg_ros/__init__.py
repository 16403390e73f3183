"""uncertain_seg_ros core: the DINOv2 segmenter with uncertainty, its bundle, inference and metrics.

No ROS imports here: the node (``uncertain_seg_ros.ros``) and the training package
(``uncertain_seg_training``) both build on this core.
"""
__version__ = "0.1.0"
