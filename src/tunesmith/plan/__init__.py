"""Plan before you run: per-device memory, a fits / does-not-fit verdict with the cheapest change that fits,
and a tokens/s estimate, from a config and the model's config.json alone (``tunesmith plan CONFIG``)."""

from tunesmith.plan.arch import ArchFacts, facts_for_model, facts_from_config, lookup_builtin
from tunesmith.plan.hardware import DeviceSpec
from tunesmith.plan.memory import Breakdown, Setup, estimate
from tunesmith.plan.planner import local_devices, plan_config, preflight
from tunesmith.plan.report import PlanReport

__all__ = [
    "ArchFacts",
    "Breakdown",
    "PlanReport",
    "Setup",
    "DeviceSpec",
    "estimate",
    "facts_for_model",
    "facts_from_config",
    "local_devices",
    "lookup_builtin",
    "plan_config",
    "preflight",
]
