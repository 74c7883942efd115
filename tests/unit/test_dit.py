"""DiT denoiser: shapes, adaLN-Zero init, labels, presets, FLOPs."""

import pytest
import torch

from scldm_scale.nn.dit import DIT_PRESETS, DiT, DiTConfig, PosEmbed, sincos_pos_embed


def tiny(**kw):
    base = dict(n_tokens=4, d_in=6, d_model=32, depth=2, n_heads=4, label_cardinalities=[3, 5])
    base.update(kw)
    return DiT(DiTConfig(**base))


@pytest.mark.parametrize("pos_embed", list(PosEmbed))
def test_zero_init_outputs_exact_zeros(pos_embed):
    torch.manual_seed(0)
    model = tiny(pos_embed=pos_embed)
    x = torch.randn(5, 4, 6)
    out = model(x, torch.rand(5), torch.tensor([[0, 1], [2, 4], [3, 5], [1, 0], [0, 0]]))
    assert out.shape == (5, 4, 6)
    assert torch.equal(out, torch.zeros_like(out))


def test_one_step_makes_output_depend_on_time_and_labels():
    torch.manual_seed(0)
    model = tiny()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, t, labels = torch.randn(8, 4, 6), torch.rand(8), torch.randint(0, 3, (8, 2))
    for _ in range(2):  # step 1 moves the zero-init final layer, step 2 the adaLN modulations
        loss = (model(x, t, labels) - x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = model(x, t, labels)
        assert out.abs().sum() > 0
        assert not torch.allclose(model(x, 1 - t, labels), out)
        assert not torch.allclose(model(x, t, model.null_labels(8)), out)


def test_null_labels_and_unconditional_model():
    model = tiny()
    null = model.null_labels(3)
    assert null.tolist() == [[3, 5]] * 3 and null.dtype == torch.long
    uncond = tiny(label_cardinalities=[])
    labels = uncond.null_labels(2)
    assert labels.shape == (2, 0)
    assert uncond(torch.randn(2, 4, 6), torch.rand(2), labels).shape == (2, 4, 6)


def test_sincos_pos_embed_is_fixed_and_distinct():
    emb = sincos_pos_embed(4, 32)
    assert emb.shape == (4, 32)
    assert torch.cdist(emb, emb).fill_diagonal_(1.0).min() > 0.1
    model = tiny(pos_embed=PosEmbed.SINCOS)
    assert "pos_embed" not in dict(model.named_parameters())
    torch.testing.assert_close(model.pos_embed[0], emb)


def test_activation_checkpointing_same_output_and_grads():
    torch.manual_seed(0)
    model = tiny()
    for p in model.parameters():  # leave the zero init so the blocks matter
        p.data.add_(0.01 * torch.randn_like(p))
    x, t, labels = torch.randn(3, 4, 6), torch.rand(3), torch.randint(0, 3, (3, 2))
    out = model(x, t, labels)
    out.square().sum().backward()
    grad = model.x_embedder.weight.grad.clone()
    model.zero_grad()
    model.cfg.activation_checkpointing = True
    out_ckpt = model(x, t, labels)
    out_ckpt.square().sum().backward()
    torch.testing.assert_close(out_ckpt, out)
    torch.testing.assert_close(model.x_embedder.weight.grad, grad)


def test_presets_and_flops():
    assert {"dit-xs", "dit-s", "dit-b", "dit-l", "dit-xl"} <= set(DIT_PRESETS)
    # DiT's S/B/L/XL (Peebles & Xie 2023): width, depth, heads
    sizes = {name: (c["d_model"], c["depth"], c["n_heads"]) for name, c in DIT_PRESETS.items()}
    assert [sizes[k] for k in ("dit-s", "dit-b", "dit-l", "dit-xl")] == [(384, 12, 6), (768, 12, 12),
                                                                        (1024, 24, 16), (1152, 28, 16)]
    small = tiny(d_model=32).flops_per_cell()
    assert 0 < small < tiny(d_model=64).flops_per_cell()
    assert small < tiny(depth=4).flops_per_cell()
