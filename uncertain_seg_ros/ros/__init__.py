"""The ROS 2 floor: the perception node and its tools (bag player, recorder, demo). Thin: no model maths."""
