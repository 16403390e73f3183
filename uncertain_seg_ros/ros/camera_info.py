"""The camera's calibration for the outputs: its ``CameraInfo`` with the output header and size.

RViz's Camera display and ``image_geometry`` pair an image with the ``camera_info`` beside it by
stamp and frame. The outputs carry the input's header, so the camera's own message fits them once
its header is theirs; when the outputs were shrunk (``max_output_pixels``), the intrinsics are
scaled to the output's size, as image_proc's resize does.
"""
import copy

from sensor_msgs.msg import CameraInfo
from std_msgs.msg import Header


def camera_info_for(info: CameraInfo, header: Header, height: int, width: int) -> CameraInfo:
    """``info`` restamped with ``header`` and, if the outputs are ``width`` x ``height`` rather than the
    calibrated size, with K, P and the region of interest scaled to them."""
    out = copy.deepcopy(info)
    out.header = header
    if (info.width, info.height) == (width, height) or info.width == 0 or info.height == 0:
        return out
    sx, sy = width / info.width, height / info.height
    k, p = list(out.k), list(out.p)
    k[0], k[2], k[4], k[5] = k[0] * sx, k[2] * sx, k[4] * sy, k[5] * sy
    p[0], p[2], p[3], p[5], p[6] = p[0] * sx, p[2] * sx, p[3] * sx, p[5] * sy, p[6] * sy
    out.k, out.p = k, p
    out.width, out.height = width, height
    roi = out.roi
    roi.x_offset, roi.width = round(roi.x_offset * sx), round(roi.width * sx)
    roi.y_offset, roi.height = round(roi.y_offset * sy), round(roi.height * sy)
    return out
