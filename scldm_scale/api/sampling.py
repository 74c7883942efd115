"""From noise (or a noised latent) to integer counts: the one path generate, transfer, reconstruct
and the in-training sample check share.

    noise (t=0) --guided DiT velocity, integrated to t=1--> standardized latents
        --de-standardize--> VAE latents --VAE decoder over all genes--> NB mean and dispersion
        --Gamma-Poisson draws--> counts

Work is cut into **blocks** of ``block_size`` cells. Block ``k`` draws its noise, its SDE increments
and its NB counts from generators seeded with :func:`block_seed` ``(seed, k)`` on the CPU, so a cell's
values depend only on the seed, the block size and its position: the same on any device, and the
same whether one process generates every block or several ranks share them
(:func:`my_blocks`). Block 0 uses ``seed`` itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from scldm_scale.config import FlowConfig
from scldm_scale.flow.guidance import GuidanceMode, check_interval, guided_velocity
from scldm_scale.flow.samplers import SamplerKind, integrate
from scldm_scale.nn.dit import DiT
from scldm_scale.nn.vae import ScVAE


def block_seed(seed: int, block: int) -> int:
    """Seed of block ``block``: ``seed`` for block 0, an independent stream for the others."""
    if block == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed) % 2**63, int(block)]).generate_state(1, np.uint64)[0] % 2**63)


def block_ranges(n: int, block_size: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` of every block of ``n`` cells."""
    return [(lo, min(lo + block_size, n)) for lo in range(0, n, block_size)]


def my_blocks(n_blocks: int, rank: int, world: int) -> list[int]:
    """The blocks rank ``rank`` of ``world`` computes (round robin)."""
    return list(range(rank, n_blocks, world))


@dataclass(frozen=True)
class Sampler:
    """How latents are sampled: a typed view of the run's ``flow`` section with overrides applied."""

    kind: SamplerKind
    num_steps: int
    guidance_mode: GuidanceMode
    guidance_a: tuple[float, ...]  # one weight per label attribute (1 = plain conditional)
    guidance_interval: tuple[float, float]
    diffusion: float  # SDE sampler only

    @classmethod
    def from_flow(cls, flow: FlowConfig, n_attributes: int) -> Sampler:
        weights = list(flow.guidance) or [1.0] * n_attributes
        return cls(SamplerKind(flow.sampler), int(flow.num_steps), GuidanceMode(flow.guidance_mode),
                   tuple(float(w) for w in weights), check_interval(flow.guidance_interval),
                   float(flow.sde_diffusion))

    def provenance(self, attributes: list[str]) -> dict:
        out = {"sampler": self.kind.value, "num_steps": self.num_steps, "guidance_mode": self.guidance_mode.value,
               "guidance": dict(zip(attributes, self.guidance_a)), "guidance_interval": list(self.guidance_interval)}
        if self.kind == SamplerKind.SDE:
            out["sde_diffusion"] = self.diffusion
        return out


@torch.no_grad()
def flow_to_data(dit: DiT, x_nmz: torch.Tensor, t0: float, labels_na: torch.Tensor, sampler: Sampler,
                 generator: torch.Generator) -> torch.Tensor:
    """Integrate the guided velocity from flow time ``t0`` (0 = noise) to 1 (data).

    The number of steps scales with the remaining path: ``ceil(num_steps * (1 - t0))`` (at least 1);
    ``t0 = 1`` returns ``x_nmz`` unchanged.
    """
    if t0 >= 1.0:
        return x_nmz
    velocity = guided_velocity(dit, labels_na, dit.cfg.label_cardinalities, sampler.guidance_a,
                               sampler.guidance_mode, sampler.guidance_interval)
    steps = max(1, int(np.ceil(sampler.num_steps * (1.0 - t0) - 1e-9)))
    return integrate(velocity, x_nmz, steps, sampler.kind, t0=float(t0), t1=1.0, diffusion=sampler.diffusion,
                     generator=generator)  # (n, m, z)


DECODE_ELEMENTS = 1 << 28  # activations (rows x width) of one unpooling chunk at inference: 1 GiB in fp32


@torch.no_grad()
def decode_counts(vae: ScVAE, z_nmz: torch.Tensor, rng: np.random.Generator,
                  library_n: torch.Tensor | None = None, means: bool = False
                  ) -> tuple[sp.csr_matrix, np.ndarray | None]:
    """NB counts (CSR int32, cells x vocabulary genes) decoded from VAE latents ``z_nmz``, and the NB
    means (float32, dense) when ``means``. The library size is the decoder's prediction unless
    ``library_n`` gives it. Cells are decoded a few at a time, so that one unpooling chunk (cells x
    ``vae.decode_chunk_size`` genes x width) stays within :data:`DECODE_ELEMENTS` whatever the block."""
    n, g = z_nmz.shape[0], vae.cfg.n_genes
    per_call = max(1, DECODE_ELEMENTS // (min(g, vae.cfg.decode_chunk_size) * vae.cfg.d_model))
    mu_parts = []
    for lo in range(0, n, per_call):
        z_kmz = z_nmz[lo:lo + per_call]
        k = z_kmz.shape[0]
        dec = vae.decode(z_kmz, torch.arange(g, device=z_nmz.device).expand(k, -1))
        lib_k = dec["log_library_n"].float().exp() if library_n is None else \
            library_n[lo:lo + per_call].to(z_nmz.device).float()
        mu_parts.append(vae.nb_mean(dec["logits_nt"].float(), lib_k).cpu().numpy())  # (k, g)
    mu_ng = np.concatenate(mu_parts) if mu_parts else np.zeros((0, g), np.float32)
    theta_g = vae.dispersion(torch.arange(g, device=z_nmz.device)).float().cpu().numpy()  # (g,)
    counts_ng = sp.csr_matrix(sample_nb(mu_ng, np.broadcast_to(theta_g, mu_ng.shape), rng))
    return counts_ng, (mu_ng.astype(np.float32) if means else None)


def sample_nb(mu_ng: np.ndarray, theta_ng: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Negative binomial draws (mean ``mu``, inverse dispersion ``theta``) as a Gamma-Poisson mixture."""
    rate_ng = rng.gamma(shape=theta_ng, scale=np.maximum(mu_ng, 1e-12) / theta_ng)
    return rng.poisson(rate_ng).astype(np.int32)


@dataclass
class CountBlock:
    """The cells of one block: rows ``[lo, hi)`` of the request."""

    block: int
    lo: int
    hi: int
    counts_ng: sp.csr_matrix
    z_nmz: np.ndarray  # VAE latents (de-standardized)
    mean_ng: np.ndarray | None = None


@torch.no_grad()
def sample_blocks(dit: DiT, vae: ScVAE, labels_na: torch.Tensor, sampler: Sampler, mean_mz: torch.Tensor,
                  std_mz: torch.Tensor, seed: int, block_size: int, blocks: list[int] | None = None,
                  source: Callable[[int, int], torch.Tensor] | None = None, t0: float = 0.0,
                  means: bool = False) -> Iterator[CountBlock]:
    """Counts for the cells with label codes ``labels_na``, block by block (see the module docstring).

    Generation (``source=None``) starts from noise at t = 0. With ``source(lo, hi)`` returning the
    VAE latents of rows ``[lo, hi)``, every cell starts from its own latent noised to flow time
    ``t0`` (``x_t0 = t0 * x + (1 - t0) * noise`` in standardized space) and is integrated from there;
    ``t0 = 1`` decodes the source latents unchanged, ``t0 = 0`` is generation with the same noise.
    Both models must be in eval mode on one device. ``blocks``: the block indices to compute
    (default: all).
    """
    device = next(dit.parameters()).device
    m, z = mean_mz.shape
    mean_mz, std_mz = mean_mz.to(device), std_mz.to(device)
    ranges = block_ranges(labels_na.shape[0], block_size)
    for k in (range(len(ranges)) if blocks is None else blocks):
        lo, hi = ranges[k]
        generator = torch.Generator().manual_seed(block_seed(seed, k))
        rng = np.random.default_rng(block_seed(seed, k))
        if source is not None and t0 >= 1.0:
            z_nmz = source(lo, hi).to(device)  # (n, m, z) nothing to integrate
        else:
            noise_nmz = torch.randn(hi - lo, m, z, generator=generator).to(device)  # (n, m, z)
            if source is None:
                x_nmz = noise_nmz
            else:
                x1_nmz = (source(lo, hi).to(device) - mean_mz) / std_mz  # (n, m, z) standardized
                x_nmz = t0 * x1_nmz + (1.0 - t0) * noise_nmz  # (n, m, z) at flow time t0
            x1_nmz = flow_to_data(dit, x_nmz, t0, labels_na[lo:hi].to(device), sampler, generator)
            z_nmz = x1_nmz * std_mz + mean_mz  # (n, m, z) VAE latents
        counts_ng, mean_ng = decode_counts(vae, z_nmz, rng, means=means)
        yield CountBlock(k, lo, hi, counts_ng, z_nmz.float().cpu().numpy(), mean_ng)


def stack_blocks(blocks: list[CountBlock], n_genes: int, latent_shape: tuple[int, int]
                 ) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray | None]:
    """Counts (CSR int32), latents (n, m*z) and means (or None) of blocks, in request order."""
    blocks = sorted(blocks, key=lambda b: b.lo)
    m, z = latent_shape
    if not blocks:
        return sp.csr_matrix((0, n_genes), dtype=np.int32), np.zeros((0, m * z), np.float32), None
    counts = sp.vstack([b.counts_ng for b in blocks], format="csr").astype(np.int32)
    latents = np.concatenate([b.z_nmz.reshape(b.hi - b.lo, -1) for b in blocks]).astype(np.float32)
    means = np.concatenate([b.mean_ng for b in blocks]) if blocks[0].mean_ng is not None else None
    return counts, latents, means
