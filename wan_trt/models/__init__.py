"""The model layer: the torch modules that export, the PyTorch reference backend and calibration run
(``graphs``: one export-friendly module per declared graph) and the dtype each computes in
(``precision``). Below the stages (``wan_trt.export``, ``wan_trt.calibration``, ``wan_trt.runtime``),
above the core declarations; it imports neither the stages nor the CLI.
"""
