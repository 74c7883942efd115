"""Encode a whole training set once, for stage 2: a trained VAE over a data source -> a latent cache.

Every rank encodes its share of the cells (models and batches on the rank's device), writes its
latent parts with the label codes and cell ids, and adds to the per-(token, dimension) sums that
give the latent mean/std; the sums are reduced over ranks (:mod:`scldm_scale.comm`) and rank 0
finalizes the cache manifest for exactly this run's ranks. Memory is bounded by one batch (and one
part buffer).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from scldm_scale import comm
from scldm_scale.api.model import encode_token_batch
from scldm_scale.api.run import load_vae
from scldm_scale.data.latent_cache import LatentCacheWriter, finalize_latent_cache
from scldm_scale.data.tokenize import tokenize_counts
from scldm_scale.data.validate import check_h5ad_shards, resolve_shards
from scldm_scale.errors import ScldmError
from scldm_scale.progress import Progress


def encode_dataset(vae_run: str | os.PathLike, data_path: str = "", out_dir: str = "", batch_size: int = 256,
                   device: str | torch.device = "auto", progress: bool = True) -> Path:
    """Write the latent cache of ``data_path`` (default: the VAE run's training data) into ``out_dir``
    (default ``<vae_run>/latents``). Collective under torchrun: every rank calls it."""
    import anndata as ad

    info = comm.init_distributed()
    rank, world = info.rank, info.world_size
    vae = load_vae(vae_run, comm.resolve_device(device))
    cfg = vae.cfg
    labels = vae.labels
    shards = resolve_shards(data_path or cfg.data.path)
    check_h5ad_shards(shards, labels.attributes)
    out = Path(out_dir or Path(vae_run) / "latents")
    m, z = cfg.vae.n_latent_tokens, cfg.vae.d_latent
    writer = LatentCacheWriter(out, rank, m, z, labels.attributes)
    rng = np.random.default_rng(cfg.run.seed + rank)
    sum_mz = torch.zeros(m, z, dtype=torch.float64)
    sumsq_mz = torch.zeros(m, z, dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)

    mine = shards[rank::world]
    with Progress(len(mine), "encode", enabled=progress and rank == 0) as bar:
        for shard in mine:
            adata = ad.read_h5ad(shard)
            var_to_vocab = vae.vocab.index_map(adata.var_names)
            labels_na = np.stack([labels.encode(a, adata.obs[a]) for a in labels.attributes], 1) \
                if labels.attributes else np.zeros((adata.n_obs, 0), dtype=np.int64)
            if "cell_index" not in adata.obs:
                raise ScldmError(f"{shard}: obs column 'cell_index' is missing; re-create the shards with "
                                 "`scldm-scale prepare`")
            cell_index_n = adata.obs["cell_index"].to_numpy(np.int64)
            x = adata.X.tocsr() if hasattr(adata.X, "tocsr") else adata.X
            for lo in range(0, adata.n_obs, batch_size):
                hi = min(lo + batch_size, adata.n_obs)
                batch = tokenize_counts(x[lo:hi], var_to_vocab, labels_na[lo:hi], cfg.data.max_genes, rng,
                                        cell_index_n[lo:hi])
                with torch.no_grad():
                    z_nmz = encode_token_batch(vae.model, batch).double().cpu()
                sum_mz += z_nmz.sum(0)
                sumsq_mz += (z_nmz * z_nmz).sum(0)
                count += z_nmz.shape[0]
                writer.write(z_nmz.float().numpy(), batch["labels_na"].numpy(), batch["cell_index_n"].numpy())
            bar.advance()
    writer.close()
    totals = comm.all_reduce_sum(torch.cat([sum_mz.flatten(), sumsq_mz.flatten(), count.reshape(1)]))
    sum_mz, sumsq_mz, count = totals[: m * z].reshape(m, z), totals[m * z: 2 * m * z].reshape(m, z), totals[-1]
    mean = sum_mz / count.clamp(min=1)
    std = (sumsq_mz / count.clamp(min=1) - mean * mean).clamp(min=1e-12).sqrt()
    if rank == 0:
        finalize_latent_cache(out, {"mean": mean.flatten().tolist(), "std": std.flatten().tolist(),
                                    "n_cells": int(count.item()), "shape": [m, z]}, world_size=world)
    comm.barrier()
    return out
