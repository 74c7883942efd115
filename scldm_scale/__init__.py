"""scldm-scale: atlas-scale latent diffusion for single-cell gene expression.

    import scldm_scale as sl
    model = sl.ScLDM.load("runs/my-ldm")
    gen = model.generate({"cell_type": {"B cell": 500}}, seed=0)
    sl.evaluate(reference_adata, gen)

``ScLDM`` and ``evaluate`` are imported on first use, so ``import scldm_scale`` stays cheap.
"""

from __future__ import annotations

import logging
import os
from typing import Any

__version__ = "0.1.0"
__all__ = ["ScLDM", "evaluate", "__version__"]

_logger = logging.getLogger(__name__)
if not _logger.handlers:  # one-line messages (gene matching, dropped genes) on stderr, as scverse tools do
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    # under torchrun every rank runs the same code: only rank 0 speaks
    _handler.addFilter(lambda record: os.environ.get("RANK", "0") == "0")
    _logger.addHandler(_handler)
    _logger.setLevel(logging.INFO)
    _logger.propagate = False


def __getattr__(name: str) -> Any:
    if name == "ScLDM":
        from scldm_scale.api.model import ScLDM

        return ScLDM
    if name == "evaluate":
        from scldm_scale.eval.evaluate import evaluate

        return evaluate
    raise AttributeError(f"module 'scldm_scale' has no attribute {name!r}")
