"""Size knobs in config.derive: heads from the width, steps from a cell budget."""

import math

import pytest

from scldm_scale.config import derive, derive_sizes, global_batch, load_config
from scldm_scale.errors import ScldmError


@pytest.mark.parametrize("width, head_dim, heads", [(16, 16, 1), (64, 16, 4), (768, 64, 12), (96, 32, 3)])
def test_zero_heads_follow_the_width_at_a_fixed_head_width(width, head_dim, heads):
    cfg = load_config([], [f"vae.d_model={width}", "vae.n_heads=0", f"scale.vae_head_dim={head_dim}",
                           f"dit.d_model={width * 2}", "dit.n_heads=0", f"scale.dit_head_dim={head_dim}"])
    derive_sizes(cfg, world_size=1)
    assert cfg.vae.n_heads == heads
    assert cfg.dit.n_heads == 2 * heads
    assert cfg.vae.d_model // cfg.vae.n_heads == head_dim


def test_explicit_heads_are_kept_and_a_bad_width_names_the_fix():
    cfg = load_config([], ["vae.d_model=64", "vae.n_heads=2"])
    assert derive_sizes(cfg).vae.n_heads == 2
    cfg = load_config([], ["vae.d_model=48", "vae.n_heads=0", "scale.vae_head_dim=32"])
    with pytest.raises(ScldmError, match=r"vae\.d_model=48.*scale\.vae_head_dim=32.*multiple"):
        derive_sizes(cfg)


@pytest.mark.parametrize("cells, batch, accum, world", [(16384, 64, 1, 1), (1000, 64, 1, 1), (120_000_000, 256, 2, 32),
                                                        (65, 8, 2, 2)])
def test_cell_budget_sets_max_steps(cells, batch, accum, world):
    cfg = load_config([], [f"train.cells={cells}", f"data.batch_size={batch}", f"train.grad_accum={accum}",
                           "train.max_steps=7"])
    derive_sizes(cfg, world_size=world)
    assert cfg.train.max_steps == math.ceil(cells / (batch * accum * world))
    assert global_batch(cfg, world) == batch * accum * world
    assert cfg.train.max_steps * global_batch(cfg, world) >= cells > (cfg.train.max_steps - 1) * global_batch(cfg, world)


def test_cell_budget_reads_the_world_size_from_the_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = load_config([], ["train.cells=1024", "data.batch_size=16"])
    derive(cfg, n_genes=10)  # the stages call derive; the knobs apply there
    assert cfg.train.max_steps == 16
    cfg = load_config([], ["train.max_steps=123"])
    assert derive_sizes(cfg).train.max_steps == 123  # no budget: max_steps as given
    with pytest.raises(ScldmError, match="train.cells=-5"):
        derive_sizes(load_config([], ["train.cells=-5"]))
