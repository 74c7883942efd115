"""Set VAE: shapes, fitting toy cells, chunked decode, FLOPs."""

import pytest
import torch

from scldm_scale.nn.likelihood import nb_log_prob
from scldm_scale.nn.packing import Packing
from scldm_scale.nn.vae import VAE_PRESETS, ScVAE, VAEConfig, ValueEmbedding
from scldm_scale.train.vae_loss import nb_nll_per_cell


def tiny_cfg(**kw):
    base = dict(n_genes=20, d_model=32, n_heads=4, n_latent_tokens=4, d_latent=8,
                n_encoder_layers=1, n_decoder_layers=1)
    base.update(kw)
    return VAEConfig(**base)


def test_requires_vocabulary_size():
    with pytest.raises(ValueError, match="n_genes"):
        ScVAE(VAEConfig())


def test_presets_build_configs():
    assert {"vae-xs", "vae-s", "vae-b", "vae-l", "vae-xl"} <= set(VAE_PRESETS)
    cfg = VAEConfig(n_genes=10, **VAE_PRESETS["vae-xs"])
    assert (cfg.d_model, cfg.n_latent_tokens, cfg.d_latent) == (64, 8, 8)


@pytest.mark.parametrize("variational", [False, True])
def test_shapes_and_normalized_latents(variational):
    torch.manual_seed(0)
    vae = ScVAE(tiny_cfg(variational=variational, value_embedding=ValueEmbedding.MULTIPLY))
    gene_ids = torch.randint(0, 20, (3, 6))
    counts = torch.randint(1, 10, (3, 6)).float()
    mask = torch.ones(3, 6, dtype=torch.bool)
    assert vae.tokenize(gene_ids, counts).shape == (3, 6, 32)
    enc = vae.encode(gene_ids, counts, mask)
    assert enc["z_nmz"].shape == enc["mu_nmz"].shape == (3, 4, 8)
    # per-token normalization without affine
    torch.testing.assert_close(enc["mu_nmz"].mean(-1), torch.zeros(3, 4), atol=1e-5, rtol=0)
    if variational:
        assert enc["logvar_nmz"].shape == (3, 4, 8)
        assert not torch.equal(enc["z_nmz"], enc["mu_nmz"])  # sampled in training mode
        vae.eval()
        enc = vae.encode(gene_ids, counts, mask)
        assert torch.equal(enc["z_nmz"], enc["mu_nmz"])
    else:
        assert enc["logvar_nmz"] is None and torch.equal(enc["z_nmz"], enc["mu_nmz"])
    dec = vae.decode(enc["z_nmz"], torch.arange(20).expand(3, 20))
    assert dec["logits_nt"].shape == (3, 20) and dec["log_library_n"].shape == (3,)
    theta = vae.dispersion(torch.arange(20).expand(3, 20))
    torch.testing.assert_close(theta, torch.ones(3, 20))


def test_nb_mean_sums_to_library_over_unmasked_genes():
    vae = ScVAE(tiny_cfg())
    logits = torch.randn(2, 5)
    mask = torch.tensor([[True] * 5, [True, True, False, True, False]])
    library = torch.tensor([100.0, 50.0])
    mean = vae.nb_mean(logits, library, mask)
    torch.testing.assert_close(mean.sum(-1), library)
    assert (mean[1, [2, 4]] == 0).all()
    torch.testing.assert_close(vae.nb_mean(logits, library).sum(-1), library)


def test_chunked_decode_equals_unchunked():
    torch.manual_seed(0)
    vae = ScVAE(tiny_cfg(decode_chunk_size=4096)).eval()
    z = torch.randn(2, 4, 8)
    gene_ids = torch.arange(20).expand(2, 20)
    with torch.no_grad():
        full = vae.decode(z, gene_ids)["logits_nt"]
        vae.cfg.decode_chunk_size = 3
        chunked = vae.decode(z, gene_ids)["logits_nt"]
    torch.testing.assert_close(chunked, full, atol=1e-6, rtol=1e-6)


def test_activation_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    vae = ScVAE(tiny_cfg())
    gene_ids = torch.randint(0, 20, (2, 5))
    counts = torch.randint(1, 10, (2, 5)).float()
    mask = torch.ones(2, 5, dtype=torch.bool)

    def grads():
        vae.zero_grad()
        z = vae.encode(gene_ids, counts, mask)["z_nmz"]
        vae.decode(z, torch.arange(20).expand(2, 20))["logits_nt"].square().sum().backward()
        return vae.latent_queries.grad.clone()

    plain = grads()
    vae.cfg.activation_checkpointing = True
    torch.testing.assert_close(grads(), plain, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("head", [{}, {"gene_readout": True, "unpool_mlp_ratio": 1.0}])
def test_tiny_vae_fits_toy_cells(head):
    torch.manual_seed(0)
    n_genes = 16
    vae = ScVAE(tiny_cfg(n_genes=n_genes, **head))
    # 4 toy cells: two expression programs, each cell's expressed genes as a token set
    rates = torch.zeros(4, n_genes)
    rates[:2, :8] = torch.linspace(1, 20, 8)
    rates[2:, 8:] = torch.linspace(20, 1, 8)
    counts_ng = torch.poisson(rates, generator=torch.Generator().manual_seed(1))
    mask_ng = counts_ng > 0
    gene_ids_ng = torch.arange(n_genes).expand(4, n_genes)
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        z = vae.encode(gene_ids_ng, counts_ng, mask_ng)["z_nmz"]
        dec = vae.decode(z, gene_ids_ng)
        mu = vae.nb_mean(dec["logits_nt"], counts_ng.sum(-1))
        nll = -nb_log_prob(counts_ng, mu, vae.dispersion(gene_ids_ng)).sum(-1).mean()
        lib = (dec["log_library_n"] - counts_ng.sum(-1).log()).square().mean()
        loss = nll + lib
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(nll.item())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 3.0
    # the decoder learned which program each cell expresses
    frac_on_program = torch.stack([mu[:2, :8].sum(-1), mu[2:, 8:].sum(-1)]).flatten() / counts_ng.sum(-1)
    assert (frac_on_program > 0.95).all()


def test_flops_per_cell_positive_and_grows_with_width():
    small = ScVAE(tiny_cfg(d_model=32)).flops_per_cell(100, 1000)
    wide = ScVAE(tiny_cfg(d_model=64)).flops_per_cell(100, 1000)
    assert 0 < small < wide
    assert ScVAE(tiny_cfg()).flops_per_cell(100, 2000) > small


def test_gene_readout_starts_as_shared_head_and_stays_gene_specific():
    torch.manual_seed(0)
    plain = ScVAE(tiny_cfg()).eval()
    torch.manual_seed(0)
    readout = ScVAE(tiny_cfg(gene_readout=True)).eval()
    z = torch.randn(2, 4, 8)
    gene_ids = torch.arange(20).expand(2, 20)
    with torch.no_grad():
        base = plain.decode(z, gene_ids)["logits_nt"]
        torch.testing.assert_close(readout.decode(z, gene_ids)["logits_nt"], base)  # zero-initialized
        readout.readout_gd[7].normal_()
        readout.logit_bias_g[7] = 3.0
        moved = readout.decode(z, gene_ids)["logits_nt"]
        # only gene 7 changed, and the decoder stays permutation equivariant over the decoded genes
        assert not torch.allclose(moved[:, 7], base[:, 7])
        torch.testing.assert_close(moved[:, torch.arange(20) != 7], base[:, torch.arange(20) != 7])
        perm = torch.randperm(20)
        torch.testing.assert_close(readout.decode(z, gene_ids[:, perm])["logits_nt"], moved[:, perm])


def test_unpool_mlp_ratio_sets_unpool_width_only():
    default = ScVAE(tiny_cfg())
    narrow = ScVAE(tiny_cfg(unpool_mlp_ratio=1.0))
    assert default.unpool.mlp.fc1.out_features == 4 * 32  # 0 = mlp_ratio
    assert narrow.unpool.mlp.fc1.out_features == 32
    assert narrow.pool.mlp.fc1.out_features == narrow.decoder_blocks[0].mlp.fc1.out_features == 4 * 32
    assert narrow.flops_per_cell(100, 1000) < default.flops_per_cell(100, 1000)


def test_no_latent_self_attention_blocks():
    """0 blocks per side: the pooling MCAB writes the latents, the unpooling MCAB reads them."""
    torch.manual_seed(0)
    vae = ScVAE(tiny_cfg(n_encoder_layers=0, n_decoder_layers=0)).eval()
    assert len(vae.encoder_blocks) == len(vae.decoder_blocks) == 0
    assert vae.flops_per_cell(100, 1000) < ScVAE(tiny_cfg()).flops_per_cell(100, 1000)
    gene_ids = torch.randint(0, 20, (3, 6))
    counts = torch.randint(1, 10, (3, 6)).float()
    mask = torch.ones(3, 6, dtype=torch.bool)
    perm = torch.randperm(6)
    with torch.no_grad():
        z = vae.encode(gene_ids, counts, mask)["z_nmz"]
        torch.testing.assert_close(vae.encode(gene_ids[:, perm], counts[:, perm], mask)["z_nmz"], z)
        out = vae(gene_ids, counts, mask, gene_ids, mask)
        assert out["logits_nt"].shape == (3, 6) and torch.isfinite(out["logits_nt"]).all()
    with pytest.raises(ValueError, match="n_encoder_layers"):
        ScVAE(tiny_cfg(n_encoder_layers=-1))


# --------------------------------------------------------------------------- packed batches


def _packed_cells(seed=0, lengths=(5, 1, 9, 0, 4), n_genes=20):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    total = int(lengths.sum())
    ids = torch.stack([torch.randperm(n_genes, generator=g)[:1] for _ in range(total)]).view(-1) if total else \
        torch.zeros(0, dtype=torch.long)
    counts = torch.randint(1, 30, (total,), generator=g).float()
    return ids, counts, Packing.from_lengths(lengths, int(lengths.max()), total)


@pytest.mark.parametrize("kw", [dict(pool_prior="expression", value_input="log1p"),
                                dict(pool_prior="uniform", value_input="log1p_cp10k", value_embedding="concat")])
def test_packed_batch_equals_each_cell_alone(kw):
    """Encoder latents, decoder logits and per-cell NB NLL of a packed batch equal those of each cell
    alone (fp32, < 1e-5): nothing of a cell depends on the rest of its batch."""
    torch.manual_seed(0)
    vae = ScVAE(tiny_cfg(row_chunks=3, **kw)).eval()
    ids, counts, tokens = _packed_cells()
    dec_len = torch.tensor([6, 3, 8, 2, 5])
    rows = Packing.from_lengths(dec_len, 8, int(dec_len.sum()))
    dec_ids = torch.randint(0, 20, (rows.total,), generator=torch.Generator().manual_seed(1))
    target = torch.randint(0, 5, (rows.total,)).float()
    weight = torch.rand(rows.total) + 0.5
    library = torch.tensor([50.0, 20.0, 80.0, 1.0, 30.0])
    with torch.no_grad():
        out = vae(ids, counts, tokens, dec_ids, rows)
        nll = nb_nll_per_cell(out["logits_r"], out["theta_r"], target, weight, rows, library)
        padded = vae.encode(tokens.pad(ids), tokens.pad(counts), tokens.mask())["z_nmz"]
        torch.testing.assert_close(padded, out["z_nmz"], atol=1e-5, rtol=0)
        for i in range(5):
            lo, hi = int(tokens.cu_seqlens[i]), int(tokens.cu_seqlens[i + 1])
            rlo, rhi = int(rows.cu_seqlens[i]), int(rows.cu_seqlens[i + 1])
            alone_tokens = Packing.from_lengths(torch.tensor([hi - lo]), max(hi - lo, 1), hi - lo)
            alone_rows = Packing.from_lengths(torch.tensor([rhi - rlo]), rhi - rlo, rhi - rlo)
            alone = vae(ids[lo:hi], counts[lo:hi], alone_tokens, dec_ids[rlo:rhi], alone_rows)
            assert (alone["z_nmz"][0] - out["z_nmz"][i]).abs().max() < 1e-5
            assert (alone["logits_r"] - out["logits_r"][rlo:rhi]).abs().max() < 1e-5
            nll_alone = nb_nll_per_cell(alone["logits_r"], alone["theta_r"], target[rlo:rhi], weight[rlo:rhi],
                                        alone_rows, library[i:i + 1])
            assert (nll_alone - nll[i]).abs().max() < 1e-5 * max(1.0, float(nll[i].abs()))
            if hi > lo:  # and the padded single-cell path agrees
                z_dense = vae.encode(ids[lo:hi][None], counts[lo:hi][None], torch.ones(1, hi - lo, dtype=torch.bool))
                assert (z_dense["z_nmz"][0] - out["z_nmz"][i]).abs().max() < 1e-5


def test_chunked_decode_with_gradients_equals_unchunked():
    """Dense decode in chunks (recomputed in the backward pass) and packed rows in chunks give the
    same logits and gradients as one chunk."""
    torch.manual_seed(0)
    vae = ScVAE(tiny_cfg())
    z = torch.randn(3, 4, 8)
    gene_ids = torch.arange(20).expand(3, 20)
    rows = Packing.from_lengths(torch.tensor([7, 2, 11]), 11, 20)
    row_ids = torch.randint(0, 20, (20,))

    def run(chunk, row_chunks):
        vae.zero_grad()
        vae.cfg.decode_chunk_size, vae.cfg.row_chunks = chunk, row_chunks
        dense = vae.decode(z, gene_ids)["logits_nt"]
        packed = vae.decode_packed(z, row_ids, rows)["logits_r"]
        (dense.sin().sum() + packed.cos().sum()).backward()
        return dense.detach(), packed.detach(), {k: p.grad.clone() for k, p in vae.named_parameters()
                                                 if p.grad is not None}

    dense, packed, grads = run(4096, 1)
    dense_c, packed_c, grads_c = run(3, 6)
    torch.testing.assert_close(dense_c, dense, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(packed_c, packed, atol=1e-6, rtol=1e-5)
    assert grads.keys() == grads_c.keys()
    for key in grads:
        torch.testing.assert_close(grads_c[key], grads[key], atol=1e-5, rtol=1e-4)


def _saved_bytes(fn) -> int:
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_all_gene_decode_memory_is_bounded_by_the_chunk():
    """Decoding every gene with gradients keeps O(n x chunk) activations: going from 2,000 to 8,000
    genes adds only the per-gene logits (a few bytes per gene), not the unpooling activations."""
    torch.manual_seed(0)
    z = torch.randn(2, 4, 8)

    def saved(n_genes, chunk):
        vae = ScVAE(tiny_cfg(n_genes=n_genes, decode_chunk_size=chunk))
        return _saved_bytes(lambda: vae.decode(z, torch.arange(n_genes).expand(2, n_genes)))

    small, large = saved(2000, 500), saved(8000, 500)
    per_gene = (large - small) / 6000
    assert per_gene < 2 * 2 * 8 * 4  # < 2 cells x 8 float32 values per decoded gene
    assert saved(8000, 8000) > 10 * large  # one chunk keeps every unpooling activation
