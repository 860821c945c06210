"""Stage 2: calibration and FP8/INT8 Q/DQ graphs (``wan_trt.calibration``).

Empty until the calibration issue lands: ``wan-trt build`` offers ``--precision fp32`` only, and says so.
"""
