"""`scldm-scale encode`: write the latents of a dataset once, for stage 2.

Shards are split across ranks (rank r takes shards r, r+W, ...), each shard is read, tokenized
and encoded in batches (memory bounded by one shard and one batch), and the latents go to a
memory-mapped latent cache with the label codes. Per-(token, dimension) mean/std over the whole
set are reduced across ranks and stored in the cache manifest; stage 2 standardizes with them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from scldm_scale.errors import ScldmError


def load_vae(vae_run: str | os.PathLike):
    """(ScVAE in eval mode, resolved VAE run config) from a VAE export."""
    from scldm_scale.nn.vae import ScVAE, VAEConfig
    from scldm_scale.train.export import load_export

    cfg, weights = load_export(vae_run)
    vae_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(VAEConfig), cfg.vae))
    model = ScVAE(vae_cfg)
    model.load_state_dict(weights)
    return model.eval(), cfg


def encode(vae_run: str, data_path: str = "", out_dir: str = "", batch_size: int = 256, progress: bool = True) -> Path:
    import anndata as ad
    import torch.distributed as dist

    from scldm_scale.data.labels import LabelTables
    from scldm_scale.data.latent_cache import LatentCacheWriter, finalize_latent_cache, shared_run_id
    from scldm_scale.data.tokenize import tokenize_counts
    from scldm_scale.data.validate import check_h5ad_shards, resolve_shards
    from scldm_scale.data.vocab import GeneVocab
    from scldm_scale.train.export import export_path

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)

    model, cfg = load_vae(vae_run)
    export = export_path(vae_run)
    vocab = GeneVocab.load(export / "vocab.json")
    labels = LabelTables.load(export / "labels.json")
    shards = resolve_shards(data_path or cfg.data.path)
    check_h5ad_shards(shards, list(labels.attributes))
    out = Path(out_dir or Path(vae_run) / "latents")
    m, z = int(cfg.vae.n_latent_tokens), int(cfg.vae.d_latent)
    run_id = shared_run_id()
    writer = LatentCacheWriter(out, rank, m, z, list(labels.attributes), run_id=run_id, world_size=world)
    rng = np.random.default_rng(int(cfg.run.seed) + rank)
    sum_mz = torch.zeros(m, z, dtype=torch.float64)
    sumsq_mz = torch.zeros(m, z, dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)

    mine = shards[rank::world]
    bar = _progress(progress and rank == 0, len(mine), "encode")
    for shard in mine:
        adata = ad.read_h5ad(shard)
        var_to_vocab = vocab.index_map(adata.var_names)
        labels_na = np.stack([labels.encode(a, adata.obs[a]) for a in labels.attributes], 1) if labels.attributes \
            else np.zeros((adata.n_obs, 0), dtype=np.int64)
        cell_index_n = adata.obs["cell_index"].to_numpy(np.int64) if "cell_index" in adata.obs else None
        if cell_index_n is None:
            raise ScldmError(f"{shard}: obs column 'cell_index' is missing; re-create the shards with `scldm-scale prepare`")
        x = adata.X.tocsr() if hasattr(adata.X, "tocsr") else adata.X
        for lo in range(0, adata.n_obs, batch_size):
            hi = min(lo + batch_size, adata.n_obs)
            batch = tokenize_counts(x[lo:hi], var_to_vocab, labels_na[lo:hi], int(cfg.data.max_genes), rng,
                                    cell_index_n[lo:hi])
            with torch.no_grad():
                z_nmz = model.encode(batch["gene_ids_ns"], batch["counts_ns"], batch["mask_ns"])["z_nmz"]
            z64 = z_nmz.double()
            sum_mz += z64.sum(0)
            sumsq_mz += (z64 * z64).sum(0)
            count += z64.shape[0]
            writer.write(z_nmz.float().numpy(), batch["labels_na"].numpy(), batch["cell_index_n"].numpy())
        bar.advance()
    writer.close()
    bar.close()
    if distributed:
        for t in (sum_mz, sumsq_mz, count):
            dist.all_reduce(t)
    mean = sum_mz / count.clamp(min=1)
    std = (sumsq_mz / count.clamp(min=1) - mean * mean).clamp(min=1e-12).sqrt()
    if rank == 0:
        finalize_latent_cache(out, {"mean": mean.flatten().tolist(), "std": std.flatten().tolist(),
                                    "n_cells": int(count.item()), "shape": [m, z]}, world_size=world, run_id=run_id)
    if distributed:
        dist.barrier()
    return out


class _progress:
    """A rich progress bar that is a no-op when disabled."""

    def __init__(self, enabled: bool, total: int, description: str) -> None:
        self._progress = None
        if enabled:
            from rich.progress import Progress

            self._progress = Progress(transient=False)
            self._task = self._progress.add_task(description, total=total)
            self._progress.start()

    def advance(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
