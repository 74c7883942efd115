"""Count likelihoods."""

from __future__ import annotations

import torch
from torch import Tensor


def nb_log_prob(counts: Tensor, mu: Tensor, theta: Tensor, eps: float = 1e-8) -> Tensor:
    """Elementwise negative-binomial log-likelihood, mean ``mu`` and inverse dispersion ``theta``.

    Equals ``scipy.stats.nbinom.logpmf(counts, n=theta, p=theta / (theta + mu))``
    (same stable form as scvi-tools ``log_nb_positive``).
    """
    log_theta_mu_eps = torch.log(theta + mu + eps)
    return (
        theta * (torch.log(theta + eps) - log_theta_mu_eps)
        + counts * (torch.log(mu + eps) - log_theta_mu_eps)
        + torch.lgamma(counts + theta)
        - torch.lgamma(theta)
        - torch.lgamma(counts + 1.0)
    )
