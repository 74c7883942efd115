"""attention() kernels and MCAB pooling / unpooling symmetries."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import scldm_scale.nn.attention as attention_module
from scldm_scale.nn.attention import (
    Kernel,
    MultiheadAttention,
    _flash_varlen,
    attend,
    attention,
    choose_kernel,
    folded_head_dim,
)
from scldm_scale.nn.mcab import MCAB, SelfAttentionBlock
from scldm_scale.nn.packing import Packing
from scldm_scale.nn.vae import ScVAE, VAEConfig


def naive_attention(q, k, v, mask_nk, bias_nk=None):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (n, h, q, k)
    if bias_nk is not None:
        scores = scores + bias_nk[:, None, None, :]
    scores = scores.masked_fill(~mask_nk[:, None, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def test_sdpa_with_mask_matches_naive_softmax():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 2, 5, 8, generator=g)
    k, v = torch.randn(3, 2, 7, 8, generator=g), torch.randn(3, 2, 7, 8, generator=g)
    mask = torch.tensor([[1] * 7, [1, 1, 1, 0, 0, 0, 0], [0, 1, 0, 1, 1, 0, 1]], dtype=torch.bool)
    torch.testing.assert_close(attention(q, k, v, mask), naive_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)
    full = torch.ones(3, 7, dtype=torch.bool)
    torch.testing.assert_close(attention(q, k, v), naive_attention(q, k, v, full), atol=1e-5, rtol=1e-5)


def test_key_bias_is_added_to_scores_and_padding_never_leaks():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 2, 5, 8, generator=g)
    k, v = torch.randn(3, 2, 7, 8, generator=g), torch.randn(3, 2, 7, 8, generator=g)
    mask = torch.tensor([[1] * 7, [1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    bias = torch.randn(3, 7, generator=g) * 2
    out = attention(q, k, v, mask, bias)
    torch.testing.assert_close(out[:2], naive_attention(q[:2], k[:2], v[:2], mask[:2], bias[:2]), atol=1e-5, rtol=1e-5)
    assert torch.equal(out[2], torch.zeros_like(out[2]))  # no real key: zeros, not NaN
    bias_padding_changed = bias.clone()
    bias_padding_changed[1, 3:] = 100.0
    torch.testing.assert_close(attention(q, k, v, mask, bias_padding_changed), out)
    # a bias alone (no mask) and a constant bias (softmax shift) are handled too
    torch.testing.assert_close(attention(q, k, v, key_bias_nk=torch.full((3, 7), 3.0)), attention(q, k, v),
                               atol=1e-5, rtol=1e-5)


def test_expression_pool_prior_weights_tokens_by_log_normalized_expression():
    vae = _vae(pool_prior="expression")
    counts = torch.tensor([[1.0, 3.0, 0.0], [5.0, 5.0, 90.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    bias = vae.pool_bias(counts, mask)
    expected = torch.log(torch.log1p(torch.tensor([[2500.0, 7500.0], [500.0, 500.0]])))
    torch.testing.assert_close(bias[:, :2], expected)
    assert torch.isfinite(bias).all()
    assert _vae(pool_prior="uniform").pool_bias(counts, mask) is None


def test_fully_masked_rows_give_zeros_not_nan():
    q, k, v = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1, :2] = True
    out = attention(q, k, v, mask)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out[1:], naive_attention(q[1:], k[1:], v[1:], mask[1:]), atol=1e-5, rtol=1e-5)


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False):
    """Pure-torch stand-in for flash_attn_varlen_func on packed (total, h, d) tensors."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = torch.zeros_like(q)
    for i in range(len(cu_q) - 1):
        qs, qe, ks, ke = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        assert qe - qs <= max_q and ke - ks <= max_k
        if ke > ks:
            qi, ki, vi = (x.transpose(0, 1) for x in (q[qs:qe], k[ks:ke], v[ks:ke]))  # (h, len, d)
            out[qs:qe] = torch.softmax(qi @ ki.transpose(-1, -2) * scale, -1).matmul(vi).transpose(0, 1)
    return out


def _packed_case(seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([6, 3, 0, 5])
    pack = Packing.from_lengths(lengths, 6, int(lengths.sum()))
    q = torch.randn(4, 5, 2, 8, generator=g)  # (n, q, h, d) fixed queries (pooling)
    k, v = torch.randn(14, 2, 8, generator=g), torch.randn(14, 2, 8, generator=g)  # packed keys
    bias = torch.randn(14, generator=g) * 2
    return q, k, v, bias, pack


@pytest.mark.parametrize("with_bias", [False, True])
def test_varlen_kernels_match_each_cell_alone(monkeypatch, with_bias):
    """Packed keys: the padded kernel and flash-attn's varlen path (a reference kernel on CPU, the
    bias folded into the head dimension) equal attention over each cell's own keys."""
    monkeypatch.setattr(attention_module, "_flash_varlen", lambda: reference_varlen)
    q, k, v, bias, pack = _packed_case()
    bias = bias if with_bias else None
    padded = attend(q, k, v, key_bias=bias, k_pack=pack, kernel=Kernel.PADDED_VARLEN)
    flash = attend(q, k, v, key_bias=bias, k_pack=pack, kernel=Kernel.FLASH_VARLEN)
    torch.testing.assert_close(flash, padded, atol=1e-5, rtol=1e-5)
    for i in range(4):
        lo, hi = int(pack.cu_seqlens[i]), int(pack.cu_seqlens[i + 1])
        if hi == lo:  # a cell without tokens pools to zeros
            assert torch.equal(padded[i], torch.zeros_like(padded[i])) and torch.equal(flash[i], padded[i])
            continue
        ki, vi = k[lo:hi].transpose(0, 1)[None], v[lo:hi].transpose(0, 1)[None]
        alone = naive_attention(q[i:i + 1].transpose(1, 2), ki, vi, torch.ones(1, hi - lo, dtype=torch.bool),
                                None if bias is None else bias[None, lo:hi]).transpose(1, 2)
        torch.testing.assert_close(padded[i:i + 1], alone, atol=1e-5, rtol=1e-5)
    # packed queries over fixed keys (unpooling): each packed row attends its own cell's keys
    rows = Packing.from_lengths(torch.tensor([2, 4, 1, 3]), 4, 10)
    q_rows = torch.randn(10, 2, 8)
    kv = torch.randn(4, 7, 2, 8)
    out = attend(q_rows, kv, kv, q_pack=rows, kernel=Kernel.PADDED_VARLEN)
    torch.testing.assert_close(attend(q_rows, kv, kv, q_pack=rows, kernel=Kernel.FLASH_VARLEN), out,
                               atol=1e-5, rtol=1e-5)
    for r in range(10):
        c = int(rows.seq_ids[r])
        expect = naive_attention(q_rows[r][None, :, None], kv[c].transpose(0, 1)[None], kv[c].transpose(0, 1)[None],
                                 torch.ones(1, 7, dtype=torch.bool))[0, :, 0]
        torch.testing.assert_close(out[r], expect, atol=1e-5, rtol=1e-5)


def test_folded_bias_equals_float_mask_in_fp32():
    """The GPU form of the expression prior (bias folded into two extra head dims, no mask) equals
    SDPA's float mask, here on CPU in fp32."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, 2, 5, 8, generator=g)
    k, v = torch.randn(3, 2, 9, 8, generator=g), torch.randn(3, 2, 9, 8, generator=g)
    bias = torch.randn(3, 9, generator=g) * 3
    folded = attention(q, k, v, key_bias_nk=bias, kernel=Kernel.SDPA_FOLDED_BIAS)
    torch.testing.assert_close(folded, attention(q, k, v, key_bias_nk=bias, kernel=Kernel.SDPA_MASK),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(folded, naive_attention(q, k, v, torch.ones(3, 9, dtype=torch.bool), bias),
                               atol=1e-5, rtol=1e-5)
    assert folded_head_dim(8) == 16 and folded_head_dim(64) == 72


def test_kernel_choice():
    """One function chooses: no mask -> SDPA (Flash on GPU); a bias on GPU -> folded, mask-free;
    packed rows -> flash-attn varlen when installed on GPU in half precision, else padded SDPA."""
    cpu, gpu = "cpu", "cuda"
    f32, bf16 = torch.float32, torch.bfloat16
    assert choose_kernel(gpu, bf16, 64, packed=False, masked=False, biased=False) == Kernel.SDPA
    assert choose_kernel(cpu, f32, 64, packed=False, masked=False, biased=False) == Kernel.SDPA
    assert choose_kernel(gpu, bf16, 64, packed=False, masked=False, biased=True) == Kernel.SDPA_FOLDED_BIAS
    assert choose_kernel(cpu, f32, 64, packed=False, masked=False, biased=True) == Kernel.SDPA_MASK  # CPU as before
    assert choose_kernel(gpu, bf16, 64, packed=False, masked=True, biased=True) == Kernel.SDPA_MASK
    assert choose_kernel(cpu, f32, 64, packed=True, masked=False, biased=True) == Kernel.PADDED_VARLEN
    has_flash = _flash_varlen() is not None
    assert (choose_kernel(gpu, bf16, 64, packed=True, masked=False, biased=True) == Kernel.FLASH_VARLEN) == has_flash
    assert choose_kernel(gpu, f32, 64, packed=True, masked=False, biased=True) == Kernel.PADDED_VARLEN


class HostSyncs(TorchDispatchMode):
    """Records the ops that read a device value back to the host (or size an output by data)."""

    SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten._unique", "aten.unique")

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        bool_index = name.startswith("aten.index.") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) or [])
        free_repeat = name.startswith("aten.repeat_interleave.") and kwargs.get("output_size") is None
        if name.startswith(self.SYNC_OPS) or bool_index or free_repeat:
            self.seen.append(name)
        return func(*args, **kwargs)


def test_forward_and_backward_have_no_host_sync():
    """Packed and padded forwards (encoder, decoder) and the packed backward never read a device
    value back to the host (checked by op; on CPU nothing syncs, on a GPU these ops would)."""
    vae = _vae(pool_prior="expression", value_input="log1p_cp10k")
    lengths = torch.tensor([3, 5])
    ids, counts = torch.randint(0, 30, (8,)), torch.randint(1, 9, (8,)).float()
    with HostSyncs() as probe:
        tokens = Packing.from_lengths(lengths, 5, 8)
        rows = Packing.from_lengths(torch.tensor([4, 6]), 6, 10)
        out = vae(ids, counts, tokens, torch.randint(0, 30, (10,)), rows)
        out["logits_r"].sum().backward()
        vae(tokens.pad(ids), tokens.pad(counts), tokens.mask(), torch.arange(30).expand(2, 30))
    assert probe.seen == []
    with HostSyncs() as probe:  # the probe itself sees syncs
        torch.tensor([1.0, 2.0]).max().item()
        torch.arange(3)[torch.tensor([True, False, True])]
    assert len(probe.seen) == 2


def test_multihead_attention_cross_and_self_shapes():
    mha = MultiheadAttention(16, 4, d_kv=8)
    assert mha(torch.randn(2, 3, 16), torch.randn(2, 5, 8)).shape == (2, 3, 16)
    sa = MultiheadAttention(16, 4)
    assert sa(torch.randn(2, 3, 16)).shape == (2, 3, 16)
    with pytest.raises(ValueError):
        MultiheadAttention(10, 4)


def test_mcab_pool_is_permutation_invariant_and_ignores_padding():
    torch.manual_seed(0)
    block = MCAB(16, 4).eval()
    q = torch.randn(1, 4, 16)
    kv = torch.randn(1, 6, 16)
    perm = torch.randperm(6)
    out = block(q, kv)
    torch.testing.assert_close(block(q, kv[:, perm]), out, atol=1e-5, rtol=1e-5)
    padded = torch.cat([kv, torch.randn(1, 3, 16)], dim=1)
    mask = torch.tensor([[True] * 6 + [False] * 3])
    torch.testing.assert_close(block(q, padded, mask), out, atol=1e-5, rtol=1e-5)
    sab = SelfAttentionBlock(16, 4).eval()
    assert sab(torch.randn(2, 4, 16)).shape == (2, 4, 16)


def _vae(**kw):
    torch.manual_seed(0)
    cfg = VAEConfig(n_genes=30, d_model=32, n_heads=4, n_latent_tokens=4, d_latent=8,
                    n_encoder_layers=1, n_decoder_layers=1, **kw)
    return ScVAE(cfg).eval()


@pytest.mark.parametrize("value_embedding", ["concat", "multiply"])
@pytest.mark.parametrize("pool_prior", ["uniform", "expression"])
def test_encoder_is_invariant_to_gene_token_order(value_embedding, pool_prior):
    vae = _vae(value_embedding=value_embedding, pool_prior=pool_prior)
    gene_ids = torch.tensor([[3, 7, 1, 12, 25, 9]])
    counts = torch.tensor([[1.0, 5.0, 2.0, 1.0, 30.0, 3.0]])
    mask = torch.ones(1, 6, dtype=torch.bool)
    perm = torch.tensor([4, 2, 0, 5, 1, 3])
    with torch.no_grad():
        z = vae.encode(gene_ids, counts, mask)["z_nmz"]
        z_perm = vae.encode(gene_ids[:, perm], counts[:, perm], mask)["z_nmz"]
    torch.testing.assert_close(z_perm, z, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pool_prior", ["uniform", "expression"])
def test_encoder_same_alone_or_padded_in_batch(pool_prior):
    vae = _vae(pool_prior=pool_prior)
    short_ids, short_counts = torch.tensor([[2, 8, 5]]), torch.tensor([[4.0, 1.0, 9.0]])
    long_ids = torch.tensor([[1, 3, 6, 11, 20, 29, 4]])
    long_counts = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])
    ids = torch.cat([torch.cat([short_ids, torch.zeros(1, 4, dtype=torch.long)], 1), long_ids])
    counts = torch.cat([torch.cat([short_counts, torch.full((1, 4), 50.0)], 1), long_counts])
    mask = torch.tensor([[True] * 3 + [False] * 4, [True] * 7])
    with torch.no_grad():
        z_alone = vae.encode(short_ids, short_counts, torch.ones(1, 3, dtype=torch.bool))["z_nmz"]
        z_batch = vae.encode(ids, counts, mask)["z_nmz"]
        z_long = vae.encode(long_ids, long_counts, torch.ones(1, 7, dtype=torch.bool))["z_nmz"]
    torch.testing.assert_close(z_batch[:1], z_alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z_batch[1:], z_long, atol=1e-5, rtol=1e-5)


def test_mcab_query_mask_skips_padding_without_changing_real_queries():
    torch.manual_seed(0)
    block = MCAB(16, 4)
    q = torch.randn(2, 5, 16, requires_grad=True)
    kv = torch.randn(2, 3, 16)
    qmask = torch.tensor([[True, False, True, True, False], [False, True, True, True, True]])
    full = block(q, kv)
    (full[qmask].square().sum()).backward()
    grad_full = q.grad.clone()
    q.grad = None
    masked = block(q, kv, query_mask_nq=qmask)
    (masked[qmask].square().sum()).backward()
    torch.testing.assert_close(masked[qmask], full[qmask], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(q.grad, grad_full, atol=1e-6, rtol=1e-5)


def test_decoder_logits_do_not_depend_on_masked_gene_queries():
    vae = _vae()
    z = torch.randn(2, 4, 8)
    ids = torch.tensor([[3, 7, 1, 0, 0], [12, 25, 9, 4, 2]])
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    with torch.no_grad():
        masked = vae.decode(z, ids, mask)["logits_nt"]
        full = vae.decode(z, ids)["logits_nt"]
    torch.testing.assert_close(masked[mask], full[mask], atol=1e-5, rtol=1e-5)
    assert torch.equal(masked[~mask], torch.zeros_like(masked[~mask]))


def test_decoder_unpool_is_equivariant_to_gene_order():
    vae = _vae()
    z = torch.randn(2, 4, 8)
    gene_ids = torch.tensor([[0, 5, 9, 17, 29], [3, 3, 8, 1, 2]])
    perm = torch.tensor([3, 0, 4, 1, 2])
    with torch.no_grad():
        out = vae.decode(z, gene_ids)
        out_perm = vae.decode(z, gene_ids[:, perm])
    torch.testing.assert_close(out_perm["logits_nt"], out["logits_nt"][:, perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_perm["log_library_n"], out["log_library_n"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_kernels_match_fp32_reference_in_bf16():
    """On a GPU in bf16: pooling with the expression prior over packed keys (flash-attn varlen when
    installed, else padded SDPA) and over a fixed-length batch (bias folded, mask-free SDPA) match the
    fp32 reference kernels."""
    g = torch.Generator(device="cuda").manual_seed(0)
    lengths = torch.tensor([9, 4, 0, 7], device="cuda")
    pack = Packing.from_lengths(lengths, 9, 20)
    q = torch.randn(4, 5, 4, 64, generator=g, device="cuda")  # (n, q, h, d)
    k, v = torch.randn(20, 4, 64, generator=g, device="cuda"), torch.randn(20, 4, 64, generator=g, device="cuda")
    bias = torch.randn(20, generator=g, device="cuda")
    reference = attend(q, k, v, key_bias=bias, k_pack=pack, kernel=Kernel.PADDED_VARLEN)  # fp32
    fast = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), key_bias=bias, k_pack=pack)
    assert torch.isfinite(fast).all() and torch.equal(fast[2], torch.zeros_like(fast[2]))
    torch.testing.assert_close(fast.float(), reference, atol=3e-2, rtol=3e-2)
    qf, kf, vf = (torch.randn(3, 4, 9, 64, generator=g, device="cuda") for _ in range(3))
    bias_nk = torch.randn(3, 9, generator=g, device="cuda") * 3
    assert choose_kernel("cuda", torch.bfloat16, 64, packed=False, masked=False, biased=True) == Kernel.SDPA_FOLDED_BIAS
    folded = attention(qf.bfloat16(), kf.bfloat16(), vf.bfloat16(), key_bias_nk=bias_nk)
    torch.testing.assert_close(folded.float(), attention(qf, kf, vf, key_bias_nk=bias_nk, kernel=Kernel.SDPA_MASK),
                               atol=3e-2, rtol=3e-2)
