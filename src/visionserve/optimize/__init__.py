"""Faster versions of installed models, chosen by measurement on this machine.

``optimize_model`` builds candidates of a model (ONNX Runtime static INT8 quantization,
calibrated on the user's images; OpenVINO float, BF16 and INT8 when it is installed),
measures each against the float model at full load and for agreement of detections, and
installs the fastest one that agrees well enough as ``<name>@<version>`` in the store.
"""

from visionserve.optimize.optimizer import CandidateResult, OptimizeReport, chosen_recipes, optimize_model
from visionserve.optimize.recipes import RECIPES, Recipe

__all__ = ["CandidateResult", "OptimizeReport", "RECIPES", "Recipe", "chosen_recipes", "optimize_model"]
