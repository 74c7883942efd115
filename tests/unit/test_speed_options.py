"""Speed options of the models: fused QKV, torch.compile of the blocks, activation checkpointing,
bf16. Each trains (the loss goes down over a few steps) and round-trips through the export."""

from __future__ import annotations

import warnings

import pytest
import torch

from scldm_scale.config import DecodeGenes, load_config
from scldm_scale.nn.attention import MultiheadAttention
from scldm_scale.nn.dit import DiT, DiTConfig
from scldm_scale.nn.packing import Packing
from scldm_scale.nn.speed import compile_blocks
from scldm_scale.nn.vae import ScVAE, VAEConfig
from scldm_scale.api.run import load_export
from scldm_scale.train.export import write_export
from scldm_scale.train.vae_loss import decode_targets, vae_loss

N_GENES = 40


def _cfg(**kw) -> VAEConfig:
    return VAEConfig(n_genes=N_GENES, d_model=32, n_heads=4, n_latent_tokens=4, d_latent=8, n_encoder_layers=1,
                     n_decoder_layers=1, **kw)


def _batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([6, 3, 9, 5])
    total = int(lengths.sum())
    return {"length_n": lengths, "gene_ids_t": torch.randint(0, N_GENES, (total,), generator=g),
            "counts_t": torch.randint(1, 12, (total,), generator=g).float(), "library_size_n": torch.zeros(4),
            "dropped_length_n": torch.zeros(4, dtype=torch.long),
            "dropped_gene_ids_e": torch.zeros(0, dtype=torch.long), "dropped_counts_e": torch.zeros(0), "max_length": 9}


def _loss(model: ScVAE, batch: dict, generator: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    tokens = Packing.from_lengths(batch["length_n"], batch["max_length"], batch["gene_ids_t"].shape[0])
    targets = decode_targets(batch, tokens, N_GENES, DecodeGenes.SAMPLED, 8, generator)
    library = tokens.segment_sum(batch["counts_t"])
    out = model(batch["gene_ids_t"], batch["counts_t"].to(dtype), tokens, targets["gene_ids"], targets["rows"])
    return vae_loss(out, targets, library, N_GENES, 0.0, 0.1)["loss"]


def _train(model: ScVAE, steps: int = 12, dtype=torch.float32) -> list[float]:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    batch = _batch()
    losses = []
    for _ in range(steps):
        loss = _loss(model, batch, generator, dtype)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _round_trip(model: ScVAE, tmp_path) -> None:
    """Export (safetensors) and load into a fresh model: the same outputs."""
    write_export(tmp_path, load_config(), model.state_dict())
    _, weights = load_export(tmp_path)
    fresh = ScVAE(model.cfg)
    fresh.load_state_dict(weights)
    batch = _batch(1)
    torch.manual_seed(0)
    model.eval(), fresh.eval()
    with torch.no_grad():
        a = _loss(model.float(), batch, torch.Generator().manual_seed(3))
        b = _loss(fresh, batch, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("option", ["default", "activation_checkpointing", "compile"])
def test_speed_option_trains_and_round_trips(option, tmp_path):
    torch.manual_seed(0)
    model = ScVAE(_cfg(activation_checkpointing=option == "activation_checkpointing"))
    if option == "compile":  # the blocks through torch.compile's graph capture (eager backend: seconds on CPU)
        assert compile_blocks(model, backend="aot_eager") == 4  # pool, unpool, 2 latent blocks
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="model.compile")  # compiled, no fallback
        losses = _train(model)
    assert losses[-1] < losses[0] - 0.05, losses
    _round_trip(model, tmp_path)


def test_speed_options_match_the_plain_model():
    """Checkpointing and compiled blocks compute the same loss and gradients as the plain model."""
    grads = {}
    for option in ("default", "activation_checkpointing", "compile"):
        torch.manual_seed(0)
        model = ScVAE(_cfg(activation_checkpointing=option == "activation_checkpointing"))
        if option == "compile":
            compile_blocks(model, backend="aot_eager")
        loss = _loss(model, _batch(), torch.Generator().manual_seed(0))
        loss.backward()
        grads[option] = (loss.detach(), model.pool.attn.q_proj.weight.grad.clone(), model.unpool.mlp.fc1.weight.grad)
    for option in ("activation_checkpointing", "compile"):
        for got, want in zip(grads[option], grads["default"]):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_bf16_forward_backward_trains_close_to_fp32():
    """The model in bf16 on CPU: finite loss and gradients, close to fp32, and it trains."""
    torch.manual_seed(0)
    fp32 = ScVAE(_cfg())
    bf16 = ScVAE(_cfg()).to(torch.bfloat16)
    bf16.load_state_dict(fp32.state_dict())
    loss32 = _loss(fp32, _batch(), torch.Generator().manual_seed(0))
    loss16 = _loss(bf16, _batch(), torch.Generator().manual_seed(0), torch.bfloat16)
    assert abs(loss16.item() - loss32.item()) < 0.03 * abs(loss32.item())
    loss16.backward()
    assert all(torch.isfinite(p.grad).all() for p in bf16.parameters() if p.grad is not None)
    losses = _train(bf16, dtype=torch.bfloat16)
    assert losses[-1] < losses[0] - 0.05, losses


def test_compile_falls_back_with_one_warning():
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no compiler here")

    torch.manual_seed(0)
    model = DiT(DiTConfig(n_tokens=4, d_in=6, d_model=32, depth=2, n_heads=4, label_cardinalities=[3]))
    x, t, labels = torch.randn(3, 4, 6), torch.rand(3), torch.zeros(3, 1, dtype=torch.long)
    expected = model(x, t, labels)
    assert compile_blocks(model, backend=broken_backend) == 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.testing.assert_close(model(x, t, labels), expected)
        model(x, t, labels)
    messages = [str(w.message) for w in caught if "model.compile" in str(w.message)]
    assert len(messages) == 2 and all("running it eagerly" in m and "\n" not in m for m in messages)  # one per block


def test_fused_qkv_loads_state_dicts_with_separate_projections():
    """Self-attention weights saved as q_proj + kv_proj (before the fused projection) load into qkv_proj."""
    torch.manual_seed(0)
    fused = MultiheadAttention(16, 4)
    w_q, w_kv = fused.qkv_proj.weight.detach()[:16], fused.qkv_proj.weight.detach()[16:]
    b_q, b_kv = fused.qkv_proj.bias.detach()[:16], fused.qkv_proj.bias.detach()[16:]
    legacy = {"q_proj.weight": w_q, "q_proj.bias": b_q, "kv_proj.weight": w_kv, "kv_proj.bias": b_kv,
              "out_proj.weight": fused.out_proj.weight.detach(), "out_proj.bias": fused.out_proj.bias.detach()}
    loaded = MultiheadAttention(16, 4)
    loaded.load_state_dict(legacy)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(loaded(x), fused(x))


@pytest.mark.slow
def test_inductor_compiled_blocks_train():
    """model.compile with the default backend (inductor: compiles C++ on CPU, minutes on 2 cores)."""
    torch.manual_seed(0)
    model = ScVAE(_cfg())
    assert compile_blocks(model) == 4
    losses = _train(model, steps=6)
    assert losses[-1] < losses[0]
