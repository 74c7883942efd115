"""Flow matching: interpolant (convention), loss, classifier-free guidance, ODE samplers."""

from scldm_scale.flow.guidance import GuidanceMode, drop_labels, guided_velocity
from scldm_scale.flow.interpolant import LinearInterpolant, TimeSampling
from scldm_scale.flow.loss import flow_matching_loss
from scldm_scale.flow.samplers import SamplerKind, integrate, nfe_to_steps

__all__ = [
    "GuidanceMode",
    "LinearInterpolant",
    "SamplerKind",
    "TimeSampling",
    "drop_labels",
    "flow_matching_loss",
    "guided_velocity",
    "integrate",
    "nfe_to_steps",
]
