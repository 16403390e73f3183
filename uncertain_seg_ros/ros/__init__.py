"""The ROS 2 floor: the perception node and its tools (bag player, recorder, demo). Thin: no model maths.

Importing it caps OpenCV's decoders (:func:`~uncertain_seg_ros.image_header.limit_opencv_decoders`)
before anything on this floor loads ``cv2``, which reads the cap only then.
"""
from ..image_header import limit_opencv_decoders

OPENCV_PIXEL_CAP = limit_opencv_decoders()
