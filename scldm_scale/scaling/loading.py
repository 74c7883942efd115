"""What the sweep reads from a trained run besides its models: whether it is exported, its size.

The models themselves are loaded through the inference layer (:mod:`scldm_scale.api`).
"""

from __future__ import annotations

import os

from safetensors import safe_open

from scldm_scale.api.run import export_path

# Weights that are per-gene or per-category tables rather than width x width maps.
EMBEDDING_PARAMS = ("gene_embedding.", "log_theta_g", "readout_gd", "logit_bias_g", "label_embedders.")


def export_parameter_counts(run_dir: str | os.PathLike) -> dict[str, int]:
    """``params`` (all trained weights) and ``params_non_embedding`` (without :data:`EMBEDDING_PARAMS`)."""
    total = non_embedding = 0
    with safe_open(str(export_path(run_dir) / "model.safetensors"), framework="pt") as fh:
        for key in fh.keys():
            numel = 1
            for dim in fh.get_slice(key).get_shape():
                numel *= int(dim)
            total += numel
            if not key.startswith(EMBEDDING_PARAMS):
                non_embedding += numel
    return {"params": total, "params_non_embedding": non_embedding}
