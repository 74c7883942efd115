"""`scldm-scale generate`: cells for requested conditions -> `.h5ad`.

Latents are sampled by integrating the guided DiT velocity from noise (t=0) to data (t=1) with
EMA weights, de-standardized, decoded over all vocabulary genes by the VAE decoder (mean =
softmax x predicted library size, per-gene dispersion) and turned into integer counts by
drawing from the negative binomial (Gamma-Poisson). The file holds counts in X (CSR int32),
the requested conditions in obs, the latents in obsm["X_latent"] and provenance in uns.
"""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf

from scldm_scale.errors import ScldmError
from scldm_scale.tasks.encode import _progress, load_vae


def parse_condition(spec: str, default_n: int) -> tuple[dict[str, str], int]:
    """``cell_type=B cell,tissue=lung:200`` -> ({"cell_type": "B cell", "tissue": "lung"}, 200)."""
    body, n = spec, default_n
    if ":" in spec:
        body, _, count = spec.rpartition(":")
        try:
            n = int(count)
        except ValueError:
            raise ScldmError(f"--condition '{spec}': the part after ':' must be a cell count") from None
    values = {}
    for item in filter(None, body.split(",")):
        if "=" not in item:
            raise ScldmError(f"--condition '{spec}': expected attribute=value pairs separated by ','")
        key, _, value = item.partition("=")
        values[key.strip()] = value.strip()
    return values, n


def read_conditions_file(path: str) -> list[tuple[dict[str, str], int]]:
    """A CSV (columns: the attributes + ``n_cells``) or a YAML list of {attribute: value, n_cells: N}."""
    p = Path(path)
    if not p.is_file():
        raise ScldmError(f"{p}: conditions file not found")
    if p.suffix in (".yaml", ".yml"):
        rows = OmegaConf.to_container(OmegaConf.load(p))
    else:
        with open(p, newline="") as fh:
            rows = list(csv.DictReader(fh))
    if not isinstance(rows, list) or not rows:
        raise ScldmError(f"{p}: expected a non-empty list of conditions with an n_cells field")
    out = []
    for i, row in enumerate(rows):
        row = dict(row)
        if "n_cells" not in row:
            raise ScldmError(f"{p}: condition {i} has no n_cells field; add the number of cells to generate")
        n = int(row.pop("n_cells"))
        out.append(({k: str(v) for k, v in row.items()}, n))
    return out


def conditions_matching(reference: str, attributes: Sequence[str], n_cells: int | None = None,
                        seed: int = 0) -> list[tuple[dict[str, str], int]]:
    """Conditions reproducing the joint obs distribution of the label columns of a reference .h5ad."""
    import anndata as ad

    obs = ad.read_h5ad(reference, backed="r").obs
    present = [a for a in attributes if a in obs.columns]
    if not present:
        raise ScldmError(f"{reference}: none of the label columns {list(attributes)} are in obs")
    counts = obs.groupby(present, observed=True).size()
    if n_cells is not None:  # rescale to n_cells, largest remainders get the leftover cells
        exact = counts / counts.sum() * n_cells
        base = np.floor(exact).astype(int)
        rest = n_cells - int(base.sum())
        order = np.argsort(-(exact - base).to_numpy(), kind="stable")[:rest]
        base.iloc[order] += 1
        counts = base
    out = []
    for key, n in counts.items():
        key = key if isinstance(key, tuple) else (key,)
        if int(n) > 0:
            out.append((dict(zip(present, map(str, key))), int(n)))
    return out


def generate(
    ldm_run: str,
    conditions: list[tuple[dict[str, str], int]],
    out_path: str,
    guidance: dict[str, float] | None = None,
    num_steps: int | None = None,
    sampler: str | None = None,
    diffusion: float | None = None,
    guidance_interval: Sequence[float] | None = None,
    seed: int = 0,
    batch_size: int = 512,
    use_ema: bool = True,
    progress: bool = True,
) -> Path:
    import anndata as ad

    from scldm_scale.data.labels import LabelTables
    from scldm_scale.data.vocab import GeneVocab
    from scldm_scale.flow.guidance import GuidanceMode, check_interval
    from scldm_scale.flow.samplers import SamplerKind
    from scldm_scale.nn.dit import DiT, DiTConfig
    from scldm_scale.train.export import export_path, load_export, read_export_json

    cfg, weights = load_export(ldm_run, ema=use_ema)
    dit = DiT(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DiTConfig), cfg.dit)))
    dit.load_state_dict(weights)
    dit.eval()
    vae_run = read_export_json(ldm_run, "vae_run.json")["vae_run"]
    vae, vae_cfg = load_vae(vae_run)
    labels = LabelTables.load(export_path(ldm_run) / "labels.json")
    stats = read_export_json(ldm_run, "latent_stats.json")
    m, z = int(vae_cfg.vae.n_latent_tokens), int(vae_cfg.vae.d_latent)
    mean_mz = torch.tensor(stats["mean"], dtype=torch.float32).reshape(m, z)
    std_mz = torch.tensor(stats["std"], dtype=torch.float32).reshape(m, z)
    gene_ids = list(GeneVocab.load(export_path(vae_run) / "vocab.json").gene_ids)

    attributes = list(labels.attributes)
    null_codes = list(labels.cardinalities)
    weights_a = [float((guidance or {}).get(a, cfg.flow.guidance[i] if len(cfg.flow.guidance) > i else 1.0))
                 for i, a in enumerate(attributes)]
    unknown_attrs = set(guidance or {}) - set(attributes)
    if unknown_attrs:
        raise ScldmError(f"--guidance: unknown attribute(s) {sorted(unknown_attrs)}; the model knows {attributes}")
    steps = int(num_steps or cfg.flow.num_steps)
    kind = SamplerKind(sampler or cfg.flow.sampler)
    if diffusion is not None and kind != SamplerKind.SDE:
        raise ScldmError(f"--diffusion sets the noise of the sde sampler; the sampler is {kind.value} "
                         "(add --sampler sde)")
    diffusion = float(cfg.flow.sde_diffusion if diffusion is None else diffusion)
    mode = GuidanceMode(cfg.flow.guidance_mode)
    try:
        interval = check_interval(cfg.flow.guidance_interval if guidance_interval is None else guidance_interval)
    except ValueError as err:
        if guidance_interval is not None:
            raise ScldmError(f"--guidance-interval: {err}; e.g. --guidance-interval 0.3 0.8") from None
        raise ScldmError(f"flow.guidance_interval of {ldm_run}: {err}; override it with --guidance-interval LO HI"
                         ) from None

    labels_na, rows_obs = condition_codes(conditions, labels)
    n_total = labels_na.shape[0]
    if n_total == 0:
        raise ScldmError("no cells requested; give --condition ...:N, --conditions FILE or --match REF.h5ad")

    torch.manual_seed(seed)
    bar = _progress(progress, n_total, "generate")
    counts_ng, latents_nk = sample_counts(dit, vae, labels_na, null_codes, weights_a, mode, steps, kind,
                                          mean_mz, std_mz, seed=seed, batch_size=batch_size, on_batch=bar.advance,
                                          diffusion=diffusion, guidance_interval=interval)
    bar.close()

    obs = pd.DataFrame(rows_obs, index=[f"gen_{i}" for i in range(n_total)])
    for a in attributes:
        obs[a] = pd.Categorical(obs[a])
    adata = ad.AnnData(X=counts_ng, obs=obs, var=pd.DataFrame(index=gene_ids))
    adata.obsm["X_latent"] = latents_nk
    adata.uns["provenance"] = {
        "ldm_run": str(Path(ldm_run).resolve()), "vae_run": str(vae_run), "seed": seed, "num_steps": steps,
        "sampler": kind.value, **({"sde_diffusion": diffusion} if kind == SamplerKind.SDE else {}),
        "guidance_mode": mode.value, "guidance": dict(zip(attributes, weights_a)),
        "guidance_interval": list(interval),
        "ema": bool(use_ema), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    return write_h5ad_atomic(adata, out_path)


def condition_codes(conditions: list[tuple[dict[str, str], int]], labels, strict: bool = True
                    ) -> tuple[torch.Tensor, list[dict[str, str]]]:
    """Label codes ``labels_na`` (one row per requested cell) and the matching obs rows.

    Attributes a condition does not name are left unconditioned (null code). ``strict``: a value
    missing from the label tables is an error; otherwise it maps to the attribute's unknown code.
    """
    attributes = list(labels.attributes)
    null_codes = list(labels.cardinalities)
    rows_codes, rows_obs = [], []
    for values, n in conditions:
        extra = set(values) - set(attributes)
        if extra:
            raise ScldmError(f"condition {values}: unknown attribute(s) {sorted(extra)}; the model knows {attributes}")
        codes = [(labels.code_of(a, values[a]) if strict else int(labels.encode(a, [values[a]])[0]))
                 if a in values else null_codes[i] for i, a in enumerate(attributes)]
        rows_codes.extend([codes] * n)
        rows_obs.extend([{a: values.get(a, "") for a in attributes}] * n)
    labels_na = torch.tensor(rows_codes, dtype=torch.long).reshape(len(rows_codes), len(attributes))
    return labels_na, rows_obs


@torch.no_grad()
def sample_counts(dit, vae, labels_na: torch.Tensor, null_codes: Sequence[int], weights_a: Sequence[float],
                  mode, num_steps: int, sampler, mean_mz: torch.Tensor, std_mz: torch.Tensor, seed: int = 0,
                  batch_size: int = 512, on_batch=None, *, diffusion: float,
                  guidance_interval: Sequence[float] = (0.0, 1.0)):
    """Cells for the label codes ``labels_na``: (integer counts, CSR cells x vocabulary genes; latents, n x m*z).

    The one path from the DiT to counts: noise (a CPU generator seeded with ``seed``, so the draws do
    not depend on the device; it also drives the SDE sampler's noise, with ``diffusion``) -> guided
    velocity (guided at the flow times in ``guidance_interval``) integrated from t=0 to t=1 -> de-standardized
    latents -> VAE decoder over all genes -> NB draws (``numpy.random.default_rng(seed)``). Both
    models must be in eval mode and on one device; the global RNG is not touched. ``on_batch(n)``
    is called after every batch of ``n`` cells.
    """
    import scipy.sparse as sp

    from scldm_scale.flow.guidance import guided_velocity
    from scldm_scale.flow.samplers import integrate

    device = next(dit.parameters()).device
    m, z = mean_mz.shape
    mean_mz, std_mz = mean_mz.to(device), std_mz.to(device)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    genes_g = torch.arange(int(vae.cfg.n_genes), device=device)
    blocks, latents = [], []
    for lo in range(0, labels_na.shape[0], batch_size):
        lab_na = labels_na[lo:lo + batch_size].to(device)
        n = lab_na.shape[0]
        x0_nmz = torch.randn(n, m, z, generator=generator).to(device)
        velocity = guided_velocity(dit, lab_na, null_codes, weights_a, mode, guidance_interval)
        x1_nmz = integrate(velocity, x0_nmz, num_steps, sampler, diffusion=diffusion,
                           generator=generator)  # (n, m, z) standardized latents
        z_nmz = x1_nmz * std_mz + mean_mz
        dec = vae.decode(z_nmz, genes_g.expand(n, -1))
        mu_ng = torch.softmax(dec["logits_nt"].float(), -1) * dec["log_library_n"].float().exp()[:, None]
        theta_ng = vae.dispersion(genes_g.expand(n, -1)).float()
        blocks.append(sp.csr_matrix(_sample_nb(mu_ng.cpu().numpy(), theta_ng.cpu().numpy(), rng)))
        latents.append(z_nmz.reshape(n, -1).cpu().numpy())
        if on_batch is not None:
            on_batch(n)
    counts_ng = sp.vstack(blocks).tocsr().astype(np.int32) if blocks else sp.csr_matrix((0, len(genes_g)), dtype=np.int32)
    latents_nk = np.concatenate(latents).astype(np.float32) if latents else np.zeros((0, m * z), np.float32)
    return counts_ng, latents_nk


def _sample_nb(mu_ng: np.ndarray, theta_ng: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Negative binomial draws as a Gamma-Poisson mixture."""
    rate_ng = rng.gamma(shape=theta_ng, scale=np.maximum(mu_ng, 1e-12) / theta_ng)
    return rng.poisson(rate_ng).astype(np.int32)


def write_h5ad_atomic(adata, out_path: str | os.PathLike) -> Path:
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        adata.write_h5ad(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
