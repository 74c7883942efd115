"""scVI as a conditional generator: the external baseline of the generation benchmark.

scVI (scvi-tools, optional extra ``bench``: ``pip install -e ".[bench]"``) is trained on the
same training cells with the label column (``cell_type``) as its categorical covariate: the
encoder and the decoder both see the label (``encode_covariates=True``), so the latent ``z``
models the variation *within* a label and the decoder carries the label. Generation follows
scVI's generative model for every requested cell:

    z ~ N(0, I)                          (the prior, n_latent dims)
    l = a total count drawn from the training cells of the requested label (empirical)
    x ~ ZINB(mu = l * decoder_scale(z, label), theta, zero-inflation(z, label))

The counts are drawn with numpy (Gamma-Poisson, then the zero-inflation mask) from a seeded
generator, so a seed gives the same cells. Everything else is scVI's defaults (1 hidden
layer of 128, 10 latent dims, ZINB, per-gene dispersion, Adam lr 1e-3), trained for
``max_epochs`` epochs (scVI's own default when None: ``min(400, 400 * 20000 / n_cells)``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scldm_scale.errors import ScldmError

__all__ = ["ScviBaseline", "train_scvi", "import_scvi"]

INSTALL_HINT = 'pip install -e ".[bench]"  (scvi-tools)'


def import_scvi():
    """``import scvi`` or a :class:`ScldmError` naming the extra to install."""
    try:
        import scvi  # noqa: F401
    except ImportError as e:
        raise ScldmError(f"the scVI baseline needs scvi-tools, which is not installed ({e}); "
                         f"install it with: {INSTALL_HINT}") from None
    return scvi


@dataclass
class ScviBaseline:
    """A trained scVI model that generates counts for requested labels."""

    model: object
    label_key: str
    categories: list[str]
    var: pd.DataFrame
    log_library_by_label: dict[str, np.ndarray]
    epochs: int
    train_seconds: float
    history: dict = field(default_factory=dict)

    def generate(self, conditions_obs: pd.DataFrame, seed: int = 0, batch_size: int = 1024):
        """One generated cell per row of ``conditions_obs`` (its label in ``conditions_obs[label_key]``).

        Returns an AnnData: integer counts in ``X`` (CSR int32), ``obs`` = a copy of
        ``conditions_obs`` (same order), ``var`` = the training ``var``.
        """
        import anndata as ad
        import torch

        if self.label_key not in conditions_obs.columns:
            raise ScldmError(f"scVI generate: conditions have no column {self.label_key!r}; "
                             f"add the requested labels as that column")
        req = conditions_obs[self.label_key].astype(str).to_numpy()
        unknown = sorted(set(req) - set(self.categories))
        if unknown:
            raise ScldmError(f"scVI generate: unknown {self.label_key} value(s) {unknown[:5]}; "
                             f"known values: {', '.join(self.categories)}")
        code_of = {c: i for i, c in enumerate(self.categories)}
        rng = np.random.default_rng(seed)
        module = self.model.module
        module.eval()
        n_latent = int(module.n_latent)
        n = len(req)
        # all random draws come from `rng`, in a fixed order, so a seed gives the same cells
        z_nl = rng.standard_normal((n, n_latent)).astype(np.float32)
        log_lib_n = np.empty(n, dtype=np.float32)
        for lab in sorted(set(req)):
            idx = np.flatnonzero(req == lab)
            log_lib_n[idx] = rng.choice(self.log_library_by_label[lab], size=len(idx), replace=True)
        batch_n = np.array([code_of[v] for v in req], dtype=np.int64)
        blocks = []
        with torch.no_grad():
            for lo in range(0, n, batch_size):
                sl = slice(lo, min(lo + batch_size, n))
                out = module.generative(z=torch.from_numpy(z_nl[sl]),
                                        library=torch.from_numpy(log_lib_n[sl])[:, None],
                                        batch_index=torch.from_numpy(batch_n[sl])[:, None])
                px = out["px"]
                mu_ng = px.mu.double().numpy()
                theta_ng = np.broadcast_to(px.theta.double().numpy(), mu_ng.shape)
                rate_ng = rng.gamma(shape=theta_ng, scale=np.maximum(mu_ng, 1e-12) / theta_ng)
                x_ng = rng.poisson(rate_ng)
                zi_logits = getattr(px, "zi_logits", None)
                if zi_logits is not None:  # ZINB: a structural zero with probability sigmoid(logit)
                    p_zero = 1.0 / (1.0 + np.exp(-zi_logits.double().numpy()))
                    x_ng[rng.random(x_ng.shape) < p_zero] = 0
                blocks.append(sp.csr_matrix(x_ng.astype(np.int32)))
        obs = conditions_obs.copy()
        obs.index = pd.Index([f"scvi_{i}" for i in range(n)])
        x = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, len(self.var)), dtype=np.int32)
        return ad.AnnData(X=x, obs=obs, var=self.var.copy())


def train_scvi(train, label_key: str, max_epochs: int | None = None, seed: int = 0,
               batch_size: int = 128, progress: bool = False, threads: int | None = None,
               **model_kwargs) -> ScviBaseline:
    """Train scVI on ``train`` (AnnData, raw counts in X) with ``label_key`` as its covariate.

    ``threads``: torch intra-op threads while training (restored afterwards); None keeps the
    current setting. ``model_kwargs`` go to ``scvi.model.SCVI`` (e.g. ``n_latent``, ``gene_likelihood``).
    """
    import torch

    scvi = import_scvi()
    if label_key not in train.obs.columns:
        raise ScldmError(f"scVI: training obs has no column {label_key!r}; pick one of {list(train.obs.columns)}")
    adata = train.copy()
    labels = adata.obs[label_key].astype(str)
    adata.obs[label_key] = pd.Categorical(labels)
    x = adata.X
    totals = np.asarray(x.sum(axis=1)).ravel().astype(np.float64)
    if (totals <= 0).any():
        raise ScldmError(f"scVI: {(totals <= 0).sum()} training cells have no counts; drop empty cells first")

    scvi.settings.seed = seed
    scvi.settings.dl_num_workers = 0
    scvi.model.SCVI.setup_anndata(adata, batch_key=label_key)
    kwargs = dict(encode_covariates=True)
    kwargs.update(model_kwargs)
    model = scvi.model.SCVI(adata, **kwargs)
    categories = [str(c) for c in
                  model.adata_manager.get_state_registry("batch").categorical_mapping]
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    t0 = time.perf_counter()
    try:
        model.train(max_epochs=max_epochs, batch_size=batch_size, accelerator="cpu", devices=1,
                    enable_progress_bar=progress, enable_model_summary=False, logger=False,
                    enable_checkpointing=False)
    finally:
        torch.set_num_threads(previous_threads)
    seconds = time.perf_counter() - t0
    if max_epochs is None:  # what SCVI.train used: scvi-tools' rule for the data size
        from scvi.model._utils import get_max_epochs_heuristic

        max_epochs = get_max_epochs_heuristic(adata.n_obs)
    epochs = int(max_epochs)
    lab = labels.to_numpy()
    log_lib = {c: np.log(totals[lab == c]).astype(np.float32) for c in categories}
    return ScviBaseline(model=model, label_key=label_key, categories=categories, var=train.var.copy(),
                        log_library_by_label=log_lib, epochs=epochs, train_seconds=seconds,
                        history={k: v.to_numpy().ravel().tolist() for k, v in model.history.items()})
