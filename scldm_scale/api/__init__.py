"""The inference layer: load a trained run and use it on AnnData (see :mod:`scldm_scale.api.model`).

Below ``train/``: nothing here imports DeepSpeed. The CLI's ``encode`` / ``generate`` / ``transfer``,
the in-training sample check and the benchmarks all go through it.
"""

from scldm_scale.api.conditions import conditions_matching, normalize_conditions, parse_condition
from scldm_scale.api.model import LATENT_KEY, ScLDM
from scldm_scale.api.run import export_path, load_dit, load_export, load_vae

__all__ = [
    "LATENT_KEY",
    "ScLDM",
    "conditions_matching",
    "export_path",
    "load_dit",
    "load_export",
    "load_vae",
    "normalize_conditions",
    "parse_condition",
]
