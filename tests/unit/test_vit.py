"""ViT encoder, MAE decoder, text tower, heads: shapes, patch layout, configs, masking consistency."""

from __future__ import annotations

import math

import pytest
import torch

from models import vit as VT
from models.heads import LogitScale, MultiHeadProjector, PairTemperature, ProjectionHead

CFG = VT.ViTConfig(preset=None, image_size=16, patch_size=4, d_model=32, n_layers=2, n_heads=2,
                   decoder_d_model=16, decoder_n_layers=1, decoder_n_heads=2).resolve()


def test_patchify_layout_and_unpatchify_round_trip():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    p = VT.patchify(x, 4)
    assert p.shape == (2, 4, 4 * 4 * 3)
    # patch 1 is the top-right 4x4 block, flattened as (row, column, channel)
    assert torch.equal(p[0, 1], x[0, :, :4, 4:].permute(1, 2, 0).reshape(-1))
    assert torch.equal(VT.unpatchify(p, 4, 3), x)
    with pytest.raises(ValueError, match="divisible"):
        VT.patchify(torch.zeros(1, 3, 10, 10), 4)


def test_sincos_position_embedding():
    pe = VT.sincos_pos_embed_2d(16, 4)
    assert pe.shape == (16, 16)
    assert torch.unique(pe, dim=0).shape[0] == 16  # every position distinct
    assert torch.allclose(pe[0, :4], torch.zeros(4)) and torch.allclose(pe[0, 4:8], torch.ones(4))  # sin 0, cos 0


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_encoder_shapes_and_masked_encoding(pool):
    cfg = CFG.model_copy(update={"pool": pool})
    torch.manual_seed(0)
    enc = VT.ViTEncoder(cfg).eval()
    x = torch.randn(3, 3, 16, 16)
    prefix = 1 if pool == "cls" else 0
    assert enc(x).shape == (3, prefix + 16, 32)
    assert enc(x, pool=True).shape == (3, 32)
    keep = torch.stack([torch.randperm(16)[:4] for _ in range(3)])
    assert enc(x, ids_keep=keep).shape == (3, prefix + 4, 32)
    # keeping every patch in order is the full encoding
    torch.testing.assert_close(enc(x, ids_keep=torch.arange(16).expand(3, 16)), enc(x))
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        enc(torch.randn(1, 3, 32, 32))


def test_mae_decoder_unshuffles_to_patch_order():
    torch.manual_seed(0)
    enc, dec = VT.ViTEncoder(CFG).eval(), VT.MAEDecoder(CFG).eval()
    x = torch.randn(2, 3, 16, 16)
    noise = torch.rand(2, 16)
    shuffle = torch.argsort(noise, 1)
    restore = torch.argsort(shuffle, 1)
    out = dec(enc(x, ids_keep=shuffle[:, :5]), restore)
    assert out.shape == (2, 16, CFG.patch_dim)
    # with no patch masked, the decoder's output does not depend on the order the tokens came in
    full = dec(enc(x, ids_keep=shuffle), restore)
    ident = dec(enc(x), torch.arange(16).expand(2, 16))
    torch.testing.assert_close(full, ident, rtol=1e-4, atol=1e-5)
    assert VT.MAEDecoder(CFG, out_dim=1)(enc(x), torch.arange(16).expand(2, 16)).shape == (2, 16, 1)


def test_presets_resolve_and_bad_configs_name_the_field():
    assert VT.available_vit_presets() == ["debug", "tiny", "small", "base"]
    base = VT.resolve_vit_config("base")
    assert (base.image_size, base.patch_size, base.d_model, base.num_patches) == (224, 16, 768, 196)
    assert VT.resolve_vit_config({"preset": "debug", "n_layers": 3}).n_layers == 3
    tiny = VT.build_encoder("tiny")
    n_params = sum(p.numel() for p in tiny.parameters())
    assert 2e6 < n_params < 3e6
    with pytest.raises(ValueError, match="patch_size"):
        VT.ViTConfig(preset="debug", patch_size=5)
    with pytest.raises(ValueError, match="n_heads"):
        VT.ViTConfig(preset="debug", n_heads=3)
    with pytest.raises(ValueError, match="unknown ViT preset"):
        VT.ViTConfig(preset="huge")
    with pytest.raises(ValueError, match="must set"):
        VT.ViTConfig(preset=None, image_size=32)


def test_encoder_follows_weight_dtype():
    enc = VT.ViTEncoder(CFG).to(torch.bfloat16)
    assert enc(torch.randn(2, 3, 16, 16), pool=True).dtype == torch.bfloat16


def test_text_encoder_ignores_padding():
    torch.manual_seed(0)
    te = VT.TextEncoder(vocab_size=10, max_len=6, d_model=16, n_layers=2, n_heads=2, out_dim=8).eval()
    ids = torch.tensor([[3, 4, 5, 0, 0, 0], [6, 7, 1, 2, 3, 9]])
    out = te(ids)
    assert out.shape == (2, 8)
    torch.testing.assert_close(te(ids[:1, :3]), out[:1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(te(torch.tensor([[5, 4, 3]])), out[:1])  # word order matters (rotary positions)


def test_heads():
    h = ProjectionHead(32, 64, 16, n_layers=3)
    assert h(torch.randn(5, 32)).shape == (5, 16)
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in h.modules()) == 2
    assert MultiHeadProjector(3, 32, 64, 16)(torch.randn(5, 32)).shape == (3, 5, 16)
    t = PairTemperature(16, tau_min=0.1, tau_max=0.5)
    tau = t.pair_tau(t(torch.randn(2, 4, 16)), t(torch.randn(2, 6, 16)))
    assert tau.shape == (2, 4, 6) and tau.min() > 0.1 and tau.max() < 0.5
    s = LogitScale()
    assert s().item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        s.log_scale.fill_(math.log(500.0))
    assert s().item() == pytest.approx(100.0)
    s().backward()
    assert s.log_scale.grad.item() == 0.0  # capped: no gradient pushes it further
    with pytest.raises(ValueError):
        LogitScale(init=200.0)
