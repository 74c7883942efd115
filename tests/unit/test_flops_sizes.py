"""FLOP formulas against torch's FlopCounterMode, parameter counts without building models, and
``scldm-scale sizes``."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from scldm_scale.cli import main
from scldm_scale.nn.dit import DIT_PRESETS, DiT, DiTConfig, dit_train_flops
from scldm_scale.nn.packing import Packing
from scldm_scale.nn.sizes import count_parameters, size_table
from scldm_scale.nn.vae import VAE_PRESETS, ScVAE, VAEConfig, vae_train_flops

aten = torch.ops.aten


def _counter() -> FlopCounterMode:
    """FlopCounterMode that also counts CPU's fused attention kernel (not in torch's table)."""
    def forward(q, k, v, *args, **kwargs):
        return sdpa_flop_count(q, k, v)

    def backward(grad_out, q, k, v, *args, **kwargs):
        return sdpa_backward_flop_count(grad_out, q, k, v)

    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward,
    })


@pytest.mark.parametrize("kw", [
    dict(),
    dict(value_embedding="concat", variational=True, gene_readout=True, unpool_mlp_ratio=1.0, pool_prior="uniform"),
    dict(n_encoder_layers=0, n_decoder_layers=0, value_input="log1p_cp10k"),
])
def test_vae_flops_formula_matches_flop_counter(kw):
    """Forward + backward FLOPs per cell of a packed training step (equal-length cells: the CPU
    attention kernel pads nothing) agree with the counted FLOPs within 10%."""
    cfg = VAEConfig(n_genes=300, d_model=64, n_heads=4, n_latent_tokens=8, d_latent=8,
                    **{"n_encoder_layers": 2, "n_decoder_layers": 2, **kw})
    torch.manual_seed(0)
    vae = ScVAE(cfg)
    n, s, t = 6, 40, 90
    tokens = Packing.from_lengths(torch.full((n,), s), s, n * s)
    rows = Packing.from_lengths(torch.full((n,), t), t, n * t)
    ids, counts = torch.randint(0, 300, (n * s,)), torch.randint(1, 9, (n * s,)).float()
    with _counter() as counter:
        out = vae(ids, counts, tokens, torch.randint(0, 300, (n * t,)), rows)
        (out["logits_r"].square().sum() + out["log_library_n"].sum() + out["z_nmz"].sum()).backward()
    counted = counter.get_total_flops() / n
    assert counted > 0
    assert abs(vae_train_flops(cfg, s, t) / counted - 1) < 0.10, (vae_train_flops(cfg, s, t), counted)


def test_dit_flops_formula_matches_flop_counter():
    cfg = DiTConfig(n_tokens=8, d_in=8, d_model=64, depth=3, n_heads=4, label_cardinalities=[3, 4])
    torch.manual_seed(0)
    dit = DiT(cfg)
    with torch.no_grad():
        for p in dit.parameters():  # leave the zero init, so that every block's backward runs in full
            p.add_(0.01)
    with _counter() as counter:
        dit(torch.randn(5, 8, 8), torch.rand(5), torch.zeros(5, 2, dtype=torch.long)).square().sum().backward()
    counted = counter.get_total_flops() / 5
    assert abs(dit_train_flops(cfg) / counted - 1) < 0.10, (dit_train_flops(cfg), counted)


def test_count_parameters_without_building_for_real():
    vae_cfg = VAEConfig(n_genes=500, **VAE_PRESETS["vae-xs"])
    dit_cfg = DiTConfig(n_tokens=8, d_in=8, label_cardinalities=[3, 5], **DIT_PRESETS["dit-xs"])
    assert count_parameters(vae_cfg) == sum(p.numel() for p in ScVAE(vae_cfg).parameters())
    assert count_parameters(dit_cfg) == sum(p.numel() for p in DiT(dit_cfg).parameters())
    big = VAEConfig(n_genes=36_000, **VAE_PRESETS["vae-xl"])  # meta device: no memory, instant
    assert count_parameters(big) > 100_000_000


def test_size_table_grows_with_the_preset():
    rows = size_table(n_genes=20_000, n_tokens=1_000, n_decoded=1_256, label_cardinalities=[10])
    for stage in ("vae", "dit"):
        mine = [r for r in rows if r.stage == stage and r.preset != f"{stage}-xs"]
        assert [r.preset for r in mine] == [f"{stage}-{s}" for s in ("s", "b", "l", "xl")]
        assert all(a.params < b.params and a.train_flops_per_cell < b.train_flops_per_cell
                   for a, b in zip(mine, mine[1:]))


def test_sizes_command(capsys):
    main(["sizes", "--genes", "2000", "--tokens", "300", "--zero-genes", "100", "--labels", "4,3", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["decoded_per_cell"] == 400 and len(out["presets"]) == len(VAE_PRESETS) + len(DIT_PRESETS)
    vae_s = next(p for p in out["presets"] if p["preset"] == "vae-s")
    assert vae_s["train_flops_per_cell"] == pytest.approx(
        vae_train_flops(VAEConfig(n_genes=2000, **VAE_PRESETS["vae-s"]), 300, 400))
    main(["sizes", "--genes", "2000", "--tokens", "300", "--decode", "all"])
    table = capsys.readouterr().out
    assert "2000 decoded genes per cell (all)" in table and "dit-xl" in table
    with pytest.raises(SystemExit):
        main(["sizes", "--labels", "x"])
