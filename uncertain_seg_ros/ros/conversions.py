"""sensor_msgs <-> numpy, with the semantics of cv_bridge (the maths is in the core's image_encoding)."""
import array
from collections.abc import Callable

import numpy as np
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from ..image_encoding import array_to_raw, compressed_to_rgb8, image_to_rgb8


def message_to_rgb8(msg: Image | CompressedImage, max_pixels: int | None = None,
                    decoder_log: Callable[[str], None] | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an Image (any supported encoding) or a CompressedImage (jpeg/png).

    Raises the core's UnsupportedEncodingError / ImageDataError for bad input, ImageTooLargeError
    (before decoding) above ``max_pixels``; ``decoder_log`` receives the decoder's warnings. For
    rgb8 without padding the array is a view of the message buffer, no copy.
    """
    if isinstance(msg, CompressedImage):
        return compressed_to_rgb8(msg.format, msg.data, max_pixels, decoder_log)
    return image_to_rgb8(msg.encoding, msg.height, msg.width, msg.step, msg.is_bigendian, msg.data, max_pixels)


def array_to_message(value: np.ndarray, encoding: str, header: Header) -> Image:
    """An Image message carrying ``value`` (mono8, mono16, rgb8 or 32FC1) with ``header`` (stamp and frame_id)."""
    height, width, step, data = array_to_raw(value, encoding)
    msg = Image(header=header, height=height, width=width, encoding=encoding, is_bigendian=0, step=step)
    msg.data = array.array("B", data)
    return msg
