"""uncertain_seg_training: offline training, adaptation, calibration and evaluation of segmenters.

Imports the core (``uncertain_seg_ros``), never the ROS node.
"""
