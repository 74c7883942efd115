"""Periodic sample quality of the LDM stage: generate a few hundred cells, compare them with held-out cells.

Every ``train.sample_every`` steps rank 0 generates ``train.sample_cells`` cells with the current
weights (EMA when on) through the same path as ``scldm-scale generate``
(:func:`~scldm_scale.api.sampling.sample_blocks`: guided sampler, VAE decoder, NB draws) and
computes ``sample/mmd`` and ``sample/w2`` against held-out cells in the fixed representation of
:mod:`scldm_scale.eval.representation`, exactly as ``scldm-scale evaluate`` does. The reference is
read, capped at :data:`MAX_REFERENCE_CELLS` and embedded once at start-up; the generated cells
follow its label composition (:func:`~scldm_scale.api.conditions.conditions_matching`).

Sampling runs on a separate eval-mode copy of the DiT on the rank's device, so the training module
(its mode, its ZeRO partitions) is never touched and no collective is involved; the noise and NB
draws come from their own generators seeded with ``run.seed`` (the same cells' noise at every call,
training RNG streams untouched).
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import torch

from scldm_scale.api.conditions import condition_codes, conditions_matching
from scldm_scale.api.run import load_vae
from scldm_scale.api.sampling import Sampler, sample_blocks, stack_blocks
from scldm_scale.config import to_object
from scldm_scale.data.source import heldout_beside
from scldm_scale.errors import ScldmError
from scldm_scale.eval.evaluate import raw_counts, read_reference
from scldm_scale.eval.metrics import mmd_rbf, wasserstein2
from scldm_scale.eval.representation import common_genes, fit_representation
from scldm_scale.nn.dit import DiT

MAX_REFERENCE_CELLS = 2000  # held-out cells kept (seeded subsample); also the metrics' max_cells
SAMPLE_BLOCK = 512  # cells per sampling block (as `generate`'s default batch size)


def resolve_sample_reference(explicit: str, vae_data_path: str, sample_every: int) -> str:
    """The held-out ``.h5ad`` of ``ldm.sample_reference``; "" when sampling is off and none is set.

    An explicit path must exist. Otherwise the default is ``heldout.h5ad`` beside the VAE's
    training shards (``data.path`` a directory, or the folder of its glob / brace pattern / file).
    """
    if explicit:
        if not Path(explicit).is_file():
            raise ScldmError(f"ldm.sample_reference={explicit}: file not found; point it at an .h5ad of "
                             "held-out cells (raw counts) or leave it empty for <VAE data.path>/heldout.h5ad")
        return str(explicit)
    if sample_every <= 0:
        return ""
    default = heldout_beside(vae_data_path)
    if not vae_data_path or not default.is_file():
        raise ScldmError(f"train.sample_every={sample_every} compares generated cells with held-out cells, but "
                         f"{default} does not exist; set ldm.sample_reference=<held-out .h5ad> or train.sample_every=0")
    return str(default)


class SampleQuality:
    """Rank-0 sample-quality check: ``__call__(weights)`` -> ``{"sample/mmd", "sample/w2", "sample/seconds"}``."""

    def __init__(self, stage, device: torch.device) -> None:
        cfg = stage.cfg
        self.seed = int(cfg.run.seed)
        n_cells = int(cfg.train.sample_cells)
        if n_cells < 2:
            raise ScldmError(f"train.sample_cells={n_cells}: need at least 2 cells to compare distributions")
        path = str(cfg.ldm.sample_reference)
        try:
            reference = read_reference(path, MAX_REFERENCE_CELLS, self.seed)
        except ScldmError as err:
            raise ScldmError(f"ldm.sample_reference={path}: {err}") from None
        vae = load_vae(cfg.ldm.vae_run, device)
        gene_ids = pd.Index(vae.vocab.gene_ids)
        try:
            common = common_genes(reference.var_names, gene_ids)
        except ScldmError as err:
            raise ScldmError(f"ldm.sample_reference={path}: {err}") from None
        self.gene_idx = None
        if common is not None:  # compare on the genes both have, in reference order
            reference = reference[:, common].copy()
            self.gene_idx = gene_ids.get_indexer(common)
        x_ref_ng = raw_counts(reference, "reference")
        self.rep = fit_representation(x_ref_ng, seed=self.seed, var_names_g=list(reference.var_names))
        self.ref_np = self.rep.transform(x_ref_ng)

        attributes = [a for a in stage.labels.attributes if a in reference.obs.columns]
        conditions = conditions_matching(reference.obs, attributes, n_cells, where=path) if attributes \
            else [({}, n_cells)]
        self.labels_na, _ = condition_codes(conditions, stage.labels, strict=False)
        self.sampler = Sampler.from_flow(to_object(cfg).flow, len(stage.labels.attributes))
        self.mean_mz, self.std_mz = stage.mean_mz, stage.std_mz
        self.vae = vae.model
        with torch.random.fork_rng(devices=[]):  # its initial weights are overwritten: keep the training RNG as is
            self.dit = DiT(stage.model_cfg).to(device).eval()
        self.dit.requires_grad_(False)

    @torch.no_grad()
    def __call__(self, weights: dict[str, torch.Tensor]) -> dict[str, float]:
        start = time.perf_counter()
        self.dit.load_state_dict(weights)
        blocks = list(sample_blocks(self.dit, self.vae, self.labels_na, self.sampler, self.mean_mz, self.std_mz,
                                    seed=self.seed, block_size=SAMPLE_BLOCK))
        counts_ng, _, _ = stack_blocks(blocks, self.vae.cfg.n_genes, tuple(self.mean_mz.shape))
        if self.gene_idx is not None:
            counts_ng = counts_ng[:, self.gene_idx]
        y_np = self.rep.transform(counts_ng)
        return {
            "sample/mmd": mmd_rbf(self.ref_np, y_np, max_cells=MAX_REFERENCE_CELLS, seed=self.seed),
            "sample/w2": wasserstein2(self.ref_np, y_np, max_cells=MAX_REFERENCE_CELLS, seed=self.seed),
            "sample/seconds": time.perf_counter() - start,
        }
