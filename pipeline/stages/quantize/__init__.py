"""The quantize stage (stage.py) and the calibration-driven methods it drives layer by layer:
AWQ scales (awq.py), the sensitivity budget (budget.py), SmoothQuant and static W8A8 scales (w8a8.py)."""

from pipeline.stages.quantize import stage  # noqa: F401  (registers the stage)
