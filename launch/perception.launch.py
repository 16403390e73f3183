"""Start the uncertain_seg_ros perception node, and optionally RViz with the overlay layout.

    ros2 launch uncertain_seg_ros perception.launch.py camera_topics:="['/front/image_raw']" rviz:=true

Arguments mirror the node's parameters and override the params file; the rest goes in the params file.
RViz shows the first camera's outputs (config/perception.rviz rendered for its namespace); where rviz2
is not installed, the launch says so and starts the node alone.
"""
import os
from typing import List

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, LogInfo, OpaqueFunction
from launch.conditions import IfCondition
from launch.substitutions import EnvironmentVariable, LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

from uncertain_seg_ros.ros.rviz_config import (
    RVIZ_MISSING, first_camera, params_file_output_namespace, rviz_installed, write_rviz_config)

PACKAGE = "uncertain_seg_ros"


def _rviz(context, dds: dict) -> list:
    """RViz on the first camera's outputs, or one line saying that rviz2 is missing (the node runs anyway)."""
    if not IfCondition(LaunchConfiguration("rviz")).evaluate(context):
        return []
    if not rviz_installed():
        return [LogInfo(msg=RVIZ_MISSING)]
    camera = first_camera(LaunchConfiguration("camera_topics").perform(context))
    sub_namespace = params_file_output_namespace(LaunchConfiguration("params_file").perform(context))
    config = write_rviz_config(camera, sub_namespace)
    return [Node(package="rviz2", executable="rviz2", name="rviz2", arguments=["-d", str(config)], additional_env=dds)]


def generate_launch_description() -> LaunchDescription:
    share = get_package_share_directory(PACKAGE)
    arguments = [
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "perception.yaml"),
                              description="YAML parameters of perception_node"),
        DeclareLaunchArgument("camera_topics", default_value="['/camera/image_raw']",
                              description="image topics to segment, as a YAML list"),
        DeclareLaunchArgument("model", default_value="camvid_demo",
                              description="model bundle folder, or the name of a shipped bundle"),
        DeclareLaunchArgument("backend", default_value="auto", description="auto, torch, torch_compile, onnxruntime or tensorrt"),
        DeclareLaunchArgument("device", default_value="auto", description="auto, cpu, cuda or cuda:N"),
        DeclareLaunchArgument("transport", default_value="raw", description="raw or compressed"),
        DeclareLaunchArgument("input_qos", default_value="sensor_data",
                              description="sensor_data, reliable, best_effort, transient_local (reliable, keeps late "
                                          "joiners' samples: deterministic bag playback) or system_default"),
        DeclareLaunchArgument("rviz", default_value="false",
                              description="also start RViz with config/perception.rviz, showing the first camera's outputs"),
        DeclareLaunchArgument(
            "dds_profile",
            default_value=EnvironmentVariable("FASTRTPS_DEFAULT_PROFILES_FILE",
                                              default_value=os.path.join(share, "config", "fastdds_large_images.xml")),
            description="Fast DDS XML profile of the node and RViz (default: $FASTRTPS_DEFAULT_PROFILES_FILE, else the "
                        "shipped large-image profile: Fast DDS's 512 KiB shared-memory segment drops image bursts)"),
    ]
    dds = {"FASTRTPS_DEFAULT_PROFILES_FILE": LaunchConfiguration("dds_profile"),
           "FASTDDS_DEFAULT_PROFILES_FILE": LaunchConfiguration("dds_profile")}
    node = Node(
        package=PACKAGE,
        executable="perception_node",
        name="perception_node",
        output="screen",
        additional_env=dds,
        parameters=[
            LaunchConfiguration("params_file"),
            {
                "camera_topics": ParameterValue(LaunchConfiguration("camera_topics"), value_type=List[str]),
                "model": LaunchConfiguration("model"),
                "backend": LaunchConfiguration("backend"),
                "device": LaunchConfiguration("device"),
                "transport": LaunchConfiguration("transport"),
                "input_qos": LaunchConfiguration("input_qos"),
            },
        ],
    )
    return LaunchDescription([*arguments, node, OpaqueFunction(function=_rviz, args=[dds])])
