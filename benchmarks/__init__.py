"""uncertain_seg_benchmarks: how fast and how well the node, its transports and the adaptation run.

The floor above the node and training: it imports both and the core, nothing imports it (the
``uncertain-seg benchmark`` command registers through the ``uncertain_seg_ros.commands`` entry
point). ``inference`` times a model per stage and end to end through a ROS 2 graph (with
``profiling``, ``roofline``, ``graph_latency``, ``cpu_load`` and ``inference_report``); ``dds_transport`` and
``adaptation`` are scripts (``python benchmarks/<name>.py``). Results live in ``benchmarks/results/``.
"""
