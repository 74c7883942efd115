"""``ScLDM``: a trained model for notebooks and scripts, AnnData in and AnnData out.

    import scldm_scale as sl
    model = sl.ScLDM.load("runs/my-ldm")                # VAE + DiT + vocabulary + labels + latent stats
    model.encode(adata)                                  # adata.obsm["X_scldm"], adata.obs["scldm_library_size"]
    gen = model.generate({"cell_type": {"B cell": 500}}, guidance={"cell_type": 2.0}, steps=30, seed=0)
    gen = model.generate(obs=ref.obs)                    # the conditions of another dataset, cell for cell
    rec = model.reconstruct(adata)                       # decoded counts (X) and NB means (layers)
    moved = model.transfer(adata, to={"cell_type": "B cell"}, strength=0.5)
    sl.evaluate(ref, gen)

A VAE run loads too (``encode`` and ``reconstruct`` only). Everything runs on the CPU or a GPU
(``device="auto"`` picks the local GPU when there is one). Under ``torchrun``, ``generate`` and
``transfer`` split their cells over the ranks and return the whole result on rank 0 (None on the
others): the same cells as one process with the same seed.

Counterfactual transfer: the cells are encoded, their standardized latents noised to flow time
``1 - strength`` (``x_t = t x + (1 - t) noise``, t = 0 noise, t = 1 data) and integrated back to
t = 1 with the new condition and guidance. ``strength=0`` returns the cells' own reconstruction,
``strength=1`` ignores them (generation from noise with the same seed and labels).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from scldm_scale import comm
from scldm_scale.api.cells import GeneMatch, counts_matrix, match_genes, token_batches
from scldm_scale.api.conditions import condition_codes, conditions_matching, normalize_conditions, obs_codes
from scldm_scale.api.run import TrainedDiT, TrainedVAE, load_dit, load_vae, run_stage
from scldm_scale.api.sampling import (
    CountBlock,
    Sampler,
    block_ranges,
    block_seed,
    decode_counts,
    my_blocks,
    sample_blocks,
    stack_blocks,
)
from scldm_scale.config import FlowConfig, Stage
from scldm_scale.errors import ScldmError
from scldm_scale.flow.guidance import check_interval
from scldm_scale.flow.samplers import SamplerKind
from scldm_scale.progress import Progress

log = logging.getLogger(__name__)

LATENT_KEY = "X_scldm"
LIBRARY_KEY = "scldm_library_size"


def encode_token_batch(vae, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Posterior mean latents ``z_nmz`` of a token batch (on the VAE's device)."""
    device = next(vae.parameters()).device
    out = vae.encode(batch["gene_ids_ns"].to(device), batch["counts_ns"].to(device), batch["mask_ns"].to(device))
    return out["mu_nmz"]  # (n, m, z)


class ScLDM:
    """A trained scLDM: the set VAE (stage 1) and, for an LDM run, the latent DiT (stage 2)."""

    def __init__(self, vae: TrainedVAE, dit: TrainedDiT | None = None) -> None:
        self._vae = vae
        self._dit = dit
        if dit is not None:
            if dit.labels.attributes != vae.labels.attributes:
                raise ScldmError(f"{dit.run}: label attributes {dit.labels.attributes} differ from its VAE's "
                                 f"{vae.labels.attributes} ({vae.run}); retrain stage 2 on this VAE's latents")
            if (dit.cfg.dit.n_tokens, dit.cfg.dit.d_in) != self.latent_shape:
                raise ScldmError(f"{dit.run}: the DiT models latents of shape {(dit.cfg.dit.n_tokens, dit.cfg.dit.d_in)}"
                                 f" but its VAE ({vae.run}) makes {self.latent_shape}; retrain stage 2 on this VAE")

    # ------------------------------------------------------------------ loading and placement

    @classmethod
    def load(cls, run: str | Path, device: str | torch.device = "auto", ema: bool = True) -> ScLDM:
        """Load a trained run: an LDM run (its VAE is found from the export) or a VAE run.

        ``device``: ``auto`` (the local GPU when there is one), ``cpu``, ``cuda`` or ``cuda:i``.
        ``ema``: sample with the DiT's EMA weights when the run kept them.
        """
        where = comm.resolve_device(device)
        if run_stage(run) == Stage.VAE:
            return cls(load_vae(run, where))
        dit = load_dit(run, where, ema=ema)
        return cls(load_vae(dit.vae_run, where), dit)

    def to(self, device: str | torch.device) -> ScLDM:
        """Move both models to ``device`` (same forms as :meth:`load`)."""
        where = comm.resolve_device(device)
        self._vae.model.to(where)
        if self._dit is not None:
            self._dit.model.to(where)
        return self

    @property
    def device(self) -> torch.device:
        return next(self._vae.model.parameters()).device

    @property
    def vae(self):
        """The VAE module (``ScVAE``)."""
        return self._vae.model

    @property
    def dit(self):
        """The DiT module, or None for a VAE run."""
        return None if self._dit is None else self._dit.model

    @property
    def gene_ids(self) -> list[str]:
        return self._vae.vocab.gene_ids

    @property
    def attributes(self) -> list[str]:
        """Label attributes the model is conditioned on (``cell_type``, ``tissue``, ...)."""
        return self._vae.labels.attributes

    @property
    def categories(self) -> dict[str, list[str]]:
        """Known values of every label attribute."""
        return self._vae.labels.categories

    @property
    def latent_shape(self) -> tuple[int, int]:
        """(latent tokens m, latent width z) of a cell."""
        return self._vae.cfg.vae.n_latent_tokens, self._vae.cfg.vae.d_latent

    def __repr__(self) -> str:
        kind = "VAE" if self._dit is None else "VAE + DiT"
        return (f"ScLDM({kind}, {len(self.gene_ids)} genes, latents {self.latent_shape}, "
                f"attributes {self.attributes}, device {self.device})")

    # ------------------------------------------------------------------ AnnData -> latents

    def _read(self, adata, layer: str | None, gene_key: str | None) -> tuple[Any, GeneMatch]:
        match = match_genes(adata.var, self._vae.vocab, gene_key)
        return counts_matrix(adata, layer), match

    @torch.no_grad()
    def _latents(self, x_ng, match: GeneMatch, labels_na: np.ndarray, seed: int, batch_size: int,
                 row_offset: int = 0, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Latents (n, m, z) and in-vocabulary library sizes (n,) of every row of ``x_ng`` (cells
        ``row_offset ...`` of the dataset)."""
        max_genes = self._vae.cfg.data.max_genes
        z_parts, lib_parts = [], []
        with Progress(x_ng.shape[0], "encode", enabled=progress) as bar:
            for lo, hi, batch in token_batches(x_ng, match, labels_na, max_genes, seed, batch_size, row_offset):
                z_parts.append(encode_token_batch(self._vae.model, batch).float().cpu().numpy())
                lib_parts.append(batch["library_size_n"].numpy())
                bar.advance(hi - lo)
        m, z = self.latent_shape
        if not z_parts:
            return np.zeros((0, m, z), np.float32), np.zeros(0, np.float32)
        return np.concatenate(z_parts), np.concatenate(lib_parts)

    def encode(self, adata, *, layer: str | None = None, gene_key: str | None = None, batch_size: int = 256,
               key: str = LATENT_KEY, seed: int = 0, progress: bool = False):
        """Latents of every cell into ``adata.obsm[key]`` (m x z flattened, float32) and the in-vocabulary
        library size into ``adata.obs["scldm_library_size"]``; returns ``adata`` (changed in place).

        ``layer``: where the raw counts are (None = X, ``"raw"`` = adata.raw.X, or a layer name).
        ``gene_key``: the var column with gene ids or symbols (default: the best match). Cells with
        more than the run's ``data.max_genes`` expressed genes are subsampled with ``seed``.
        """
        x_ng, match = self._read(adata, layer, gene_key)
        z_nmz, library_n = self._latents(x_ng, match, obs_codes(self._vae.labels, adata.obs), seed, batch_size,
                                         progress=progress)
        adata.obsm[key] = z_nmz.reshape(z_nmz.shape[0], -1)
        adata.obs[LIBRARY_KEY] = library_n
        adata.uns["scldm"] = {"run": str(self._vae.run), "latent_key": key, "latent_shape": list(self.latent_shape),
                              "genes": match.summary()}
        return adata

    # ------------------------------------------------------------------ latents -> counts

    def _output(self, counts_ng, latents_nk, obs: pd.DataFrame, provenance: dict, means_ng=None):
        import anndata as ad

        var = pd.DataFrame(index=pd.Index(self.gene_ids, name="gene_id"))
        if self._vae.vocab.symbols is not None:  # ids and symbols, as CELLxGENE files carry them
            var["feature_name"] = self._vae.vocab.symbols
        out = ad.AnnData(X=counts_ng, obs=obs, var=var)
        out.obsm[LATENT_KEY] = latents_nk
        if means_ng is not None:
            out.layers["scldm_mean"] = means_ng
        out.uns["provenance"] = {**provenance, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        return out

    @torch.no_grad()
    def reconstruct(self, adata, *, layer: str | None = None, gene_key: str | None = None, batch_size: int = 256,
                    seed: int = 0, means: bool = True, progress: bool = False):
        """The cells decoded from their own latents: NB draws in X (CSR int32, all vocabulary genes),
        NB means in ``layers["scldm_mean"]`` (dense float32; ``means=False`` skips them), the latents in
        ``obsm["X_scldm"]``, the input obs. Draws are seeded by ``seed`` per block of ``batch_size`` cells."""
        x_ng, match = self._read(adata, layer, gene_key)
        labels_na = obs_codes(self._vae.labels, adata.obs)
        blocks = []
        with Progress(adata.n_obs, "reconstruct", enabled=progress) as bar:
            for k, (lo, hi) in enumerate(block_ranges(adata.n_obs, batch_size)):
                z_nmz, _ = self._latents(x_ng[lo:hi], match, labels_na[lo:hi], seed, hi - lo, row_offset=lo)
                rng = np.random.default_rng(block_seed(seed, k))
                counts_ng, mean_ng = decode_counts(self._vae.model, torch.from_numpy(z_nmz).to(self.device), rng,
                                                   means=means)
                blocks.append(CountBlock(k, lo, hi, counts_ng, z_nmz, mean_ng))
                bar.advance(hi - lo)
        counts_ng, latents_nk, means_ng = stack_blocks(blocks, len(self.gene_ids), self.latent_shape)
        obs = adata.obs.copy()
        return self._output(counts_ng, latents_nk, obs, {"vae_run": str(self._vae.run), "seed": seed,
                                                        "genes": match.summary()}, means_ng)

    def _require_dit(self, what: str) -> TrainedDiT:
        if self._dit is None:
            raise ScldmError(f"{self._vae.run} is a VAE run: {what} needs the latent diffusion model; "
                             "load the LDM run (ScLDM.load(<LDM run dir>))")
        return self._dit

    def sampler(self, guidance: dict[str, float] | None = None, guidance_interval=None, steps: int | None = None,
                sampler: str | None = None, diffusion: float | None = None) -> Sampler:
        """The run's sampling settings (``flow`` section) with the given overrides, checked."""
        dit = self._require_dit("sampling")
        flow: FlowConfig = dit.cfg.flow
        attributes = self.attributes
        unknown = set(guidance or {}) - set(attributes)
        if unknown:
            raise ScldmError(f"guidance: unknown attribute(s) {sorted(unknown)}; the model knows {attributes}")
        base = Sampler.from_flow(flow, len(attributes))
        weights = tuple(float((guidance or {}).get(a, base.guidance_a[i])) for i, a in enumerate(attributes))
        kind = SamplerKind(sampler) if sampler is not None else base.kind
        if diffusion is not None and kind != SamplerKind.SDE:
            raise ScldmError(f"diffusion (--diffusion) sets the noise of the sde sampler; the sampler is "
                             f"{kind.value}; add sampler='sde' (--sampler sde)")
        if steps is not None and steps < 1:
            raise ScldmError(f"steps (--steps) = {steps}: must be >= 1")
        interval = base.guidance_interval
        if guidance_interval is not None:
            try:
                interval = check_interval(guidance_interval)
            except ValueError as err:
                raise ScldmError(f"guidance_interval (--guidance-interval): {err}; e.g. (0.3, 0.8)") from None
        return Sampler(kind, int(steps or base.num_steps), base.guidance_mode, weights, interval,
                       float(base.diffusion if diffusion is None else diffusion))

    def _sample(self, labels_na: torch.Tensor, sampler: Sampler, seed: int, batch_size: int, progress: bool,
                source=None, t0: float = 0.0) -> tuple[Any, np.ndarray] | None:
        """Counts and latents of every requested cell: this rank's blocks, gathered on rank 0."""
        dit = self._require_dit("sampling")
        n = labels_na.shape[0]
        n_blocks = len(block_ranges(n, batch_size))
        mine = my_blocks(n_blocks, comm.rank(), comm.world_size())
        done = []
        with Progress(n, "generate", enabled=progress and comm.rank() == 0) as bar:
            for block in sample_blocks(dit.model, self._vae.model, labels_na, sampler, dit.mean_mz, dit.std_mz,
                                       seed, batch_size, blocks=mine, source=source, t0=t0):
                done.append(block)
                bar.advance((block.hi - block.lo) * comm.world_size())
        gathered = comm.gather_objects(done)
        if gathered is None:
            return None
        counts_ng, latents_nk, _ = stack_blocks([b for part in gathered for b in part], len(self.gene_ids),
                                                self.latent_shape)
        return counts_ng, latents_nk

    def generate(self, conditions: Any = None, *, obs: pd.DataFrame | None = None, n_cells: int | None = None,
                 guidance: dict[str, float] | None = None, guidance_interval=None, steps: int | None = None,
                 sampler: str | None = None, diffusion: float | None = None, seed: int = 0,
                 batch_size: int = 512, progress: bool = False):
        """Generate cells: integer counts in X (CSR int32, vocabulary genes), the conditions in obs, the
        latents in ``obsm["X_scldm"]`` and the settings in ``uns["provenance"]``.

        ``conditions``: ``{"cell_type": {"B cell": 500}}`` or ``[({"cell_type": "B cell", "tissue": "blood"},
        500), ...]``; ``obs``: match another dataset's label columns, one cell per row (or ``n_cells``
        cells in its proportions). Both may be given. ``guidance``: weight per attribute (1 = plain
        conditional); ``guidance_interval``: (lo, hi) flow times where guidance applies; ``steps``,
        ``sampler`` (euler, heun, adaptive, sde), ``diffusion`` (sde): override the run's settings.
        The cells depend only on ``seed`` and ``batch_size`` (not the device or the number of ranks).
        Under torchrun: the whole result on rank 0, None on the other ranks.
        """
        requested = normalize_conditions(conditions)
        if obs is not None:
            requested += conditions_matching(obs, self.attributes, n_cells)
        if not requested:
            raise ScldmError("no cells requested; pass conditions={'cell_type': {'B cell': 100}} or obs=<DataFrame> "
                             "(CLI: --condition ...:N, --conditions FILE or --match REF.h5ad)")
        spec = self.sampler(guidance, guidance_interval, steps, sampler, diffusion)
        labels_na, out_obs = condition_codes(requested, self._vae.labels)
        if labels_na.shape[0] == 0:
            raise ScldmError("the requested conditions ask for 0 cells; give at least one cell")
        result = self._sample(labels_na, spec, seed, batch_size, progress)
        if result is None:
            return None
        counts_ng, latents_nk = result
        return self._output(counts_ng, latents_nk, out_obs, {
            "ldm_run": str(Path(self._dit.run).resolve()), "vae_run": str(self._vae.run), "seed": seed,
            "batch_size": batch_size, **spec.provenance(self.attributes), "ema": self._dit.ema})

    def transfer(self, adata, to: dict[str, str], strength: float = 0.5, *, guidance: dict[str, float] | None = None,
                 guidance_interval=None, steps: int | None = None, sampler: str | None = None,
                 diffusion: float | None = None, layer: str | None = None, gene_key: str | None = None,
                 seed: int = 0, batch_size: int = 512, progress: bool = False):
        """Counterfactual cells: ``adata``'s cells moved to the condition ``to`` (e.g.
        ``{"cell_type": "B cell"}``) with ``strength`` in [0, 1] (see the module docstring).

        Attributes not in ``to`` keep the cells' own values (from obs; unconditioned where obs lacks
        the column). Returns counts (X), the new latents (``obsm["X_scldm"]``) and obs with the new
        values and the original ones in ``source_<attribute>`` columns. Same seeding and rank
        splitting as :meth:`generate`.
        """
        if not 0.0 <= float(strength) <= 1.0:
            raise ScldmError(f"strength={strength}: must be in [0, 1] (0 = the cells' own reconstruction, "
                             "1 = generation from noise with the new condition)")
        labels = self._vae.labels
        unknown = set(to) - set(self.attributes)
        if unknown:
            raise ScldmError(f"to: unknown attribute(s) {sorted(unknown)}; the model knows {self.attributes}")
        spec = self.sampler(guidance, guidance_interval, steps, sampler, diffusion)
        x_ng, match = self._read(adata, layer, gene_key)
        own_codes_na = obs_codes(labels, adata.obs)
        codes_na = own_codes_na.copy()
        for i, attr in enumerate(labels.attributes):
            if attr in to:
                codes_na[:, i] = labels.code_of(attr, to[attr])

        def source(lo: int, hi: int) -> torch.Tensor:
            z_nmz, _ = self._latents(x_ng[lo:hi], match, own_codes_na[lo:hi], seed, hi - lo, row_offset=lo)
            return torch.from_numpy(z_nmz)

        result = self._sample(torch.from_numpy(codes_na), spec, seed, batch_size, progress, source=source,
                              t0=1.0 - float(strength))
        if result is None:
            return None
        counts_ng, latents_nk = result
        obs = adata.obs.copy()
        for attr, value in to.items():
            if attr in obs.columns:
                obs[f"source_{attr}"] = obs[attr]
            obs[attr] = pd.Categorical([str(value)] * len(obs))
        return self._output(counts_ng, latents_nk, obs, {
            "ldm_run": str(Path(self._dit.run).resolve()), "vae_run": str(self._vae.run), "seed": seed,
            "batch_size": batch_size, "strength": float(strength), "to": dict(to), "genes": match.summary(),
            **spec.provenance(self.attributes)})
