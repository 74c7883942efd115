"""Held-out metrics of a finished run, recorded by the sweep.

- VAE: negative-binomial NLL per held-out cell over **all** vocabulary genes (the training loss
  without gene sampling), with the observed library size (``val_nll_per_cell``, the scaling
  metric) and with the library size the model predicts from its latents
  (``val_nll_per_cell_predicted_library``, what generation uses).
- LDM: the flow-matching loss of held-out cells (encoded by the run's VAE, standardized with the
  run's latent statistics, conditioned on their labels; ``t`` uniform on [0, 1] and the noise
  drawn from a fixed seed, ``flow_draws`` draws per cell, so runs are compared on the same draws
  whatever their training time sampling), and MMD / W2 / FD of generated cells with the held-out
  label composition against the held-out cells (as ``scldm-scale evaluate`` measures them).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from scldm_scale.api import ScLDM, load_dit, load_vae
from scldm_scale.api.cells import counts_matrix, match_genes, token_batches
from scldm_scale.api.conditions import obs_codes
from scldm_scale.api.model import encode_token_batch
from scldm_scale.data.source import heldout_beside
from scldm_scale.errors import ScldmError
from scldm_scale.eval.evaluate import evaluate, read_reference
from scldm_scale.flow.interpolant import TimeSampling
from scldm_scale.flow.loss import flow_matching_loss
from scldm_scale.nn.likelihood import nb_log_prob
from scldm_scale.scaling.grid import EvalSpec


def heldout_path(explicit: str, data_path: str) -> Path:
    """``explicit`` when given, else ``heldout.h5ad`` beside the training data (``data.path``)."""

    path = Path(explicit) if explicit else heldout_beside(data_path)
    if not path.is_file():
        raise ScldmError(f"{path}: no held-out cells for the sweep's metrics; write them with `scldm-scale prepare "
                         "... --heldout-fraction 0.05` or set eval.heldout in the grid")
    return path


def _blocks(adata, vocab, max_genes: int, batch_size: int, seed: int):
    """(encoder token batch, counts over the vocabulary ``target_ng``) per batch of held-out cells."""

    match = match_genes(adata.var, vocab)
    x_ng = counts_matrix(adata, None, "held-out cells")
    no_labels_na = np.zeros((adata.n_obs, 0), dtype=np.int64)
    n_genes = len(vocab.gene_ids)
    capped = token_batches(x_ng, match, no_labels_na, max_genes, seed, batch_size)
    every = token_batches(x_ng, match, no_labels_na, n_genes, seed, batch_size)  # no subsampling: the targets
    for (_, _, batch), (_, _, full) in zip(capped, every):
        target_ng = torch.zeros(full["mask_ns"].shape[0], n_genes)
        target_ng.scatter_add_(1, full["gene_ids_ns"], full["counts_ns"] * full["mask_ns"])  # padding adds 0
        yield batch, target_ng


@torch.no_grad()
def vae_metrics(vae_run: str | os.PathLike, heldout: str | os.PathLike, spec: EvalSpec, seed: int = 0) -> dict:
    """``val_nll_per_cell``, ``val_nll_per_cell_predicted_library``, ``val_library_mse``, ``val_cells``."""

    trained = load_vae(vae_run)
    adata = read_reference(heldout, spec.heldout_cells, seed)
    return vae_nll(trained.model, trained.vocab, trained.cfg.data.max_genes, adata, spec.batch_size, seed)


@torch.no_grad()
def vae_nll(model: torch.nn.Module, vocab, max_genes: int, adata, batch_size: int = 256, seed: int = 0) -> dict:
    """Held-out metrics of an ScVAE (eval mode) on the cells of ``adata`` (raw counts)."""

    genes_g = torch.arange(len(vocab.gene_ids))
    theta_g = model.dispersion(genes_g).float()  # (g,)
    nll, nll_pred, lib_se, n_cells = 0.0, 0.0, 0.0, 0
    for batch, target_ng in _blocks(adata, vocab, int(max_genes), batch_size, seed):
        n = target_ng.shape[0]
        z_nmz = encode_token_batch(model, batch)  # (n, m, z) posterior means
        dec = model.decode(z_nmz, genes_g.expand(n, -1))
        logits_ng = dec["logits_nt"].float()  # (n, g)
        library_n = batch["library_size_n"].float()  # (n,)
        predicted_n = dec["log_library_n"].float().exp()  # (n,)
        theta_ng = theta_g.expand(n, -1)
        nll -= float(nb_log_prob(target_ng, model.nb_mean(logits_ng, library_n), theta_ng).sum())
        nll_pred -= float(nb_log_prob(target_ng, model.nb_mean(logits_ng, predicted_n), theta_ng).sum())
        lib_se += float((dec["log_library_n"].float() - library_n.clamp(min=1.0).log()).pow(2).sum())
        n_cells += n
    return {"val_nll_per_cell": nll / n_cells, "val_nll_per_cell_predicted_library": nll_pred / n_cells,
            "val_library_mse": lib_se / n_cells, "val_cells": n_cells}


@torch.no_grad()
def ldm_metrics(ldm_run: str | os.PathLike, heldout: str | os.PathLike, spec: EvalSpec, seed: int = 0) -> dict:
    """``val_flow_loss`` and the sample metrics ``sample_mmd``, ``sample_w2``, ``sample_fd``."""

    dit = load_dit(ldm_run)
    vae = load_vae(dit.vae_run)
    adata = read_reference(heldout, spec.heldout_cells, seed)
    labels_na = torch.from_numpy(obs_codes(dit.labels, adata.obs))
    generator = torch.Generator().manual_seed(seed)
    total, n_cells = 0.0, 0
    for batch, _ in _blocks(adata, vae.vocab, vae.cfg.data.max_genes, spec.batch_size, seed):
        x1_nmz = (encode_token_batch(vae.model, batch) - dit.mean_mz) / dit.std_mz  # (n, m, z) standardized
        n = x1_nmz.shape[0]
        lab_na = labels_na[n_cells:n_cells + n]
        for _ in range(spec.flow_draws):
            out = flow_matching_loss(lambda x, t: dit.model(x, t, lab_na), x1_nmz, generator, TimeSampling.UNIFORM)
            total += float(out["loss_per_cell_n"].sum())
        n_cells += n
    metrics = {"val_flow_loss": total / (n_cells * spec.flow_draws), "val_cells": n_cells}

    attributes = [a for a in dit.labels.attributes if a in adata.obs.columns]
    model = ScLDM(vae, dit)
    generated = model.generate(obs=adata.obs[attributes] if attributes else None,
                               conditions=None if attributes else [({}, spec.sample_cells)],
                               n_cells=spec.sample_cells if attributes else None,
                               steps=spec.sample_steps or None, seed=seed)
    res = evaluate(adata, generated, label_keys=attributes, seed=seed, per_condition=False,
                   max_cells=spec.heldout_cells)
    metrics.update({"sample_mmd": float(res["mmd"]), "sample_w2": float(res["w2"]), "sample_fd": float(res["fd"]),
                    "sample_cells": int(res["n_gen"])})
    return metrics
