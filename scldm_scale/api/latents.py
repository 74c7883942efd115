"""Encode a whole data set once, for stage 2: a trained VAE over any data source -> a latent cache.

The data is the VAE run's own (``data:`` section of its config) unless overridden (``data.*`` keys:
another path, another kind of source - h5ad shards, a SOMA experiment or the Census, a mixture).
Every rank encodes its share of the source's inference pass (every selected cell once, models and
batches on the rank's device), writes its latent parts with the label codes and cell ids, and adds
to the per-(token, dimension) sums that give the latent mean/std. The sums are reduced over ranks
once at the end (:mod:`scldm_scale.comm`; ranks may hold different numbers of batches, so nothing is
exchanged per batch) and rank 0 finalizes the cache for exactly this run's ranks. Memory is bounded
by one batch and one part buffer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from scldm_scale import comm
from scldm_scale.api.model import encode_token_batch
from scldm_scale.api.run import load_vae
from scldm_scale.config import Config, apply_overrides
from scldm_scale.data.config import DataConfig
from scldm_scale.data.latent_cache import LatentCacheWriter, finalize_latent_cache, shared_run_id
from scldm_scale.data.loader import build_source
from scldm_scale.errors import ScldmError
from scldm_scale.progress import Progress


def encode_data_config(cfg: Config, overrides: Sequence[str] = ()) -> DataConfig:
    """The data section of a VAE run's config with ``data.*`` overrides (``data.path=...``,
    ``data.source=soma``, ``data.max_genes=4096``)."""
    bad = [o for o in overrides if not o.startswith("data.")]
    if bad:
        raise ScldmError(f"encode: {bad[0]!r}: only data.* overrides apply (e.g. data.source=soma "
                         "data.path=atlas.soma data.max_genes=4096)")
    return apply_overrides(cfg, overrides).data


def encode_dataset(vae_run: str | os.PathLike, overrides: Sequence[str] = (), out_dir: str = "",
                   batch_size: int = 256, device: str | torch.device = "auto", progress: bool = True) -> Path:
    """Write the latent cache of the VAE run's data (with ``data.*`` ``overrides``) into ``out_dir``
    (default ``<vae_run>/latents``). Collective under torchrun: every rank calls it."""
    info = comm.init_distributed()
    rank, world = info.rank, info.world_size
    vae = load_vae(vae_run, comm.resolve_device(device))
    data_cfg = encode_data_config(vae.cfg, overrides)
    source = build_source(data_cfg, vae.vocab, vae.labels)
    out = Path(out_dir or Path(vae_run) / "latents")
    m, z = vae.cfg.vae.n_latent_tokens, vae.cfg.vae.d_latent
    run_id = shared_run_id()
    writer = LatentCacheWriter(out, rank, m, z, vae.labels.attributes, run_id=run_id, world_size=world)
    sums = torch.zeros(2 * m * z + 1, dtype=torch.float64)  # sum, sum of squares, count
    with Progress(source.inference_cells(rank, world), f"encode ({source.describe()})",
                  enabled=progress and rank == 0) as bar:
        for batch in source.inference_batches(rank, world, batch_size):
            with torch.no_grad():
                z_nmz = encode_token_batch(vae.model, batch).double().cpu()  # (n, m, z)
            sums[: m * z] += z_nmz.sum(0).flatten()
            sums[m * z: 2 * m * z] += (z_nmz * z_nmz).sum(0).flatten()
            sums[-1] += z_nmz.shape[0]
            writer.write(z_nmz.float().numpy(), batch["labels_na"].numpy(), batch["cell_index_n"].numpy())
            bar.advance(z_nmz.shape[0])
    writer.close()
    sums = comm.all_reduce_sum(sums)
    count = sums[-1].clamp(min=1)
    mean = sums[: m * z] / count
    std = (sums[m * z: 2 * m * z] / count - mean * mean).clamp(min=1e-12).sqrt()
    stats = {"mean": mean.tolist(), "std": std.tolist(), "n_cells": int(sums[-1]), "shape": [m, z]}
    comm.on_rank0(lambda: finalize_latent_cache(out, stats, world_size=world, run_id=run_id))
    return out
