"""Topic names of a camera's outputs, without importing rclpy or the model (the launch file uses them too)."""


def output_namespace(image_topic: str, sub_namespace: str) -> str:
    """``/front/image_raw`` -> ``/front/<sub_namespace>``: each camera's outputs beside its image topic."""
    parent = image_topic.rsplit("/", 1)[0]
    return f"{parent}/{sub_namespace}"


def camera_info_topic(image_topic: str) -> str:
    """``/front/image_raw`` -> ``/front/camera_info``: where image_transport puts a camera's calibration."""
    parent = image_topic.rsplit("/", 1)[0]
    return f"{parent}/camera_info"
