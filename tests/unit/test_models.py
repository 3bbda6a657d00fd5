"""Unit tests of the models package: configs and presets, the decoder's attention modes, rotary
embeddings, RMSNorm, grouped-query attention, save/load, sampling, parameter and FLOP counts."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import models
from models import ModelConfig, ResolvedModelConfig
from models.config import default_ffn_hidden
from models.decoder import DecoderLM, RMSNorm, apply_rotary, rotary_tables
from models.flops import param_breakdown


def _debug(**overrides) -> DecoderLM:
    torch.manual_seed(0)
    return models.build({"preset": "debug", **overrides})


def _ids(model: DecoderLM, batch: int = 2, seq_len: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.vocab_size, (batch, seq_len), generator=g)


# ---------------------------------------------------------------- config and presets


def test_importing_models_and_validating_a_config_does_not_import_torch():
    code = "import sys, models; models.ModelConfig(preset='1b').resolve(); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_available_lists_builtin_presets_in_size_order():
    assert models.available()[:4] == ["debug", "tiny", "small", "1b"]


def test_registering_a_duplicate_preset_raises():
    with pytest.raises(ValueError, match="already registered"):
        models.register("tiny", d_model=8)


def test_unknown_preset_lists_available():
    with pytest.raises(ValueError, match="available: debug, tiny, small, 1b"):
        models.build("huge")


def test_default_ffn_hidden_is_8_thirds_rounded_up_to_64():
    assert [default_ffn_hidden(d) for d in (64, 256, 768, 2048)] == [192, 704, 2048, 5504]


def test_debug_param_count_matches_hand_calculation():
    # d=64, L=2, ffn=192, V=256, tied: embedding + per layer (4 d^2 attention + 3 d ffn MLP + 2 norms) + final norm
    expected = 256 * 64 + 2 * (4 * 64 * 64 + 3 * 64 * 192 + 2 * 64) + 64
    assert expected == 123_200
    assert models.num_params("debug") == expected
    assert models.num_params(_debug()) == expected


def test_tiny_param_count_in_range_and_analytic_matches_the_module():
    torch.manual_seed(0)
    model = models.build("tiny")
    assert 3_000_000 <= models.num_params(model) <= 6_000_000
    assert models.num_params(model) == models.num_params("tiny")
    assert models.num_params(model, exclude_embedding=True) == models.num_params(
        "tiny", exclude_embedding=True
    )


def test_analytic_count_matches_module_for_untied_gqa():
    spec = {"preset": "debug", "n_kv_heads": 2, "tie_embeddings": False, "ffn_hidden": 96}
    model = models.build(spec)
    assert models.num_params(model) == models.num_params(spec)
    assert models.num_params(model, exclude_embedding=True) == models.num_params(spec, exclude_embedding=True)
    assert models.num_params(spec) - models.num_params(spec, exclude_embedding=True) == 256 * 64


def test_large_preset_counts_from_config_without_allocating():
    small, billion = models.num_params("small"), models.num_params("1b")
    assert 100e6 <= small <= 140e6
    assert 1.0e9 <= billion <= 1.2e9
    # 1b: untied embeddings, 4 kv heads of 128 -> k/v projections are 2048 x 512
    parts = param_breakdown("1b")
    assert parts["lm_head"] == parts["embedding"] == 32000 * 2048
    assert parts["attention"] == 22 * (2 * 2048 * 2048 + 2 * 2048 * 512)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"d_model": 0}, "d_model=0"),
        ({"n_layers": -1}, "n_layers=-1"),
        ({"vocab_size": 0}, "vocab_size=0"),
        ({"d_model": 100, "n_heads": 3}, "d_model=100"),
        ({"n_heads": 4, "n_kv_heads": 3}, "n_kv_heads=3"),
        ({"d_model": 12, "n_heads": 4}, "head_dim=3"),
        ({"n_heads": 5}, "d_model=256"),  # tiny's d_model=256 is not divisible by the override
        ({"dropout": 1.0}, "dropout=1.0"),
        ({"norm_eps": 0.0}, "norm_eps=0.0"),
        ({"preset": "nope"}, "available: debug"),
        ({"d_modle": 64}, "d_modle"),
    ],
)
def test_bad_config_values_raise_naming_the_field(fields, named):
    with pytest.raises(ValueError, match=named):
        ModelConfig(**fields)


def test_resolve_precedence_preset_then_runtime_then_explicit():
    cfg = ModelConfig(preset="tiny").resolve(vocab_size=1000, max_seq_len=64)
    assert (cfg.vocab_size, cfg.max_seq_len, cfg.d_model) == (1000, 64, 256)
    cfg = ModelConfig(preset="tiny", vocab_size=1024, max_seq_len=128).resolve(
        vocab_size=1000, max_seq_len=64
    )
    assert (cfg.vocab_size, cfg.max_seq_len) == (1024, 128)
    with pytest.raises(ValueError, match="vocab_size=512 is smaller"):
        ModelConfig(preset="tiny", vocab_size=512).resolve(vocab_size=1000)
    with pytest.raises(ValueError, match="max_seq_len"):
        models.resolve_config(models.resolve_config("debug"), max_seq_len=4096)


def test_resolve_without_preset_needs_every_required_size():
    with pytest.raises(ValueError, match="n_layers"):
        ModelConfig(preset=None, d_model=64, n_heads=4).resolve(vocab_size=100, max_seq_len=32)
    cfg = ModelConfig(preset=None, d_model=64, n_heads=4, n_layers=1).resolve(vocab_size=100, max_seq_len=32)
    assert (cfg.n_kv_heads, cfg.ffn_hidden) == (4, 192)


def test_every_preset_resolves_and_roundtrips_through_json():
    for name in models.available():
        cfg = models.resolve_config(name)
        assert ResolvedModelConfig.model_validate_json(cfg.model_dump_json()) == cfg


# ---------------------------------------------------------------- building blocks


def test_rmsnorm_output_has_unit_rms():
    torch.manual_seed(0)
    x = torch.randn(4, 10, 64) * 37.0 + 3.0
    norm = RMSNorm(64, eps=1e-5)
    rms = norm(x).pow(2).mean(dim=-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-4, rtol=0)
    with torch.no_grad():
        norm.weight.fill_(2.0)
    rms = norm(x).pow(2).mean(dim=-1).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, 2.0), atol=2e-4, rtol=0)


def test_rotary_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    head_dim, seq_len = 8, 32
    cos, sin = rotary_tables(head_dim, seq_len, theta=10000.0)
    q, k = torch.randn(head_dim), torch.randn(head_dim)
    q_at = apply_rotary(q.expand(seq_len, head_dim), cos, sin)  # row i: q at position i
    k_at = apply_rotary(k.expand(seq_len, head_dim), cos, sin)  # row j: k at position j
    scores = q_at @ k_at.T  # (i, j)
    for offset in range(-seq_len + 1, seq_len):
        diagonal = scores.diagonal(offset)  # all (i, j) with j - i = offset
        torch.testing.assert_close(diagonal, diagonal[:1].expand_as(diagonal), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores[0, 0], q @ k)  # position 0 is not rotated
    assert not torch.allclose(scores[5, 2], scores[5, 3], atol=1e-3)  # and the offset matters
    torch.testing.assert_close(q_at.norm(dim=-1), q.norm().expand(seq_len))  # rotations keep norms


def test_rotary_matches_complex_rotation_of_the_paper():
    # Pair (x_i, x_{i + D/2}) as the complex number z_i; position p multiplies it by exp(1j p theta^(-2i/D)).
    torch.manual_seed(0)
    head_dim, seq_len, theta = 8, 16, 500.0
    x = torch.randn(seq_len, head_dim)
    cos, sin = rotary_tables(head_dim, seq_len, theta=theta)
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * freqs  # (T, D/2)
    z = torch.complex(x[:, : head_dim // 2].double(), x[:, head_dim // 2 :].double()) * torch.polar(
        torch.ones_like(angles), angles
    )
    expected = torch.cat((z.real, z.imag), dim=-1).float()
    torch.testing.assert_close(apply_rotary(x, cos, sin), expected, atol=1e-5, rtol=1e-5)


def test_rotary_tables_are_not_in_the_state_dict_and_stay_float32():
    model = _debug()
    assert not any("rotary" in key for key in model.state_dict())
    fresh_cos, _ = rotary_tables(model.cfg.head_dim, model.cfg.max_seq_len)
    model = model.to(torch.bfloat16)
    assert model.rotary.cos.dtype == torch.float32
    torch.testing.assert_close(model.rotary.cos, fresh_cos, atol=0, rtol=0)
    assert model.tok_emb.weight.dtype == torch.bfloat16


def test_residual_output_projections_use_scaled_init():
    torch.manual_seed(0)
    model = models.build("tiny")
    std = model.cfg.init_std
    scaled = std / math.sqrt(2 * model.cfg.n_layers)
    assert model.blocks[0].attn.o_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert model.blocks[0].mlp.w_down.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert model.blocks[0].attn.q_proj.weight.std().item() == pytest.approx(std, rel=0.05)


# ---------------------------------------------------------------- forward and attention modes


def test_forward_shapes_int32_and_hidden():
    model = _debug()
    ids = _ids(model)
    logits, hidden = model(ids, return_hidden=True)
    assert logits.shape == (2, 16, 256) and hidden.shape == (2, 16, 64)
    torch.testing.assert_close(model(ids.to(torch.int32)), logits, atol=0, rtol=0)
    torch.testing.assert_close(model.lm_head(hidden), logits, atol=0, rtol=0)
    assert model.lm_head.weight is model.tok_emb.weight


def test_forward_rejects_bad_inputs():
    model = _debug(max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="int32/int64"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="is_causal=False"):
        model(torch.zeros(1, 4, dtype=torch.long), attn_mask=models.causal_mask(4))
    with pytest.raises(ValueError, match="bool of shape"):
        model(
            torch.zeros(1, 4, dtype=torch.long),
            attn_mask=torch.ones(1, 1, 4, 5, dtype=torch.bool),
            is_causal=False,
        )


def _logits_after_changing(model: DecoderLM, ids: torch.Tensor, position: int, **kwargs):
    changed = ids.clone()
    changed[:, position] = (changed[:, position] + 1) % model.cfg.vocab_size
    with torch.no_grad():
        return model(ids, **kwargs), model(changed, **kwargs)


def test_causal_mode_hides_the_future_and_bidirectional_mode_does_not():
    model = _debug()
    ids = _ids(model)
    t = 7
    before, after = _logits_after_changing(model, ids, t + 1)
    torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], atol=1e-6, rtol=0)
    assert (after[:, t + 1 :] - before[:, t + 1 :]).abs().amax() > 1e-3
    before, after = _logits_after_changing(model, ids, t + 1, is_causal=False)
    change_per_position = (after[:, : t + 1] - before[:, : t + 1]).abs().amax(dim=-1)  # (B, t + 1)
    assert change_per_position.min() > 1e-5  # every earlier position sees the later token


def test_prefix_lm_mask_matches_hand_written_pattern():
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(models.prefix_lm_mask(2, 5), expected[None, None])
    per_example = models.prefix_lm_mask(torch.tensor([0, 2, 5]), 5)
    assert per_example.shape == (3, 1, 5, 5)
    assert torch.equal(per_example[0], models.causal_mask(5)[0])
    assert torch.equal(per_example[1, 0], expected)
    assert per_example[2].all()
    with pytest.raises(ValueError, match="prefix_len=6"):
        models.prefix_lm_mask(6, 5)


def test_prefix_lm_model_is_bidirectional_in_the_prefix_and_causal_after():
    model = _debug()
    ids = _ids(model)
    prefix = 6
    mask = models.prefix_lm_mask(prefix, ids.shape[1])
    # a prefix token is seen by every position, including earlier prefix positions
    before, after = _logits_after_changing(model, ids, 3, attn_mask=mask, is_causal=False)
    assert (after - before).abs().amax(dim=-1).min() > 1e-5
    # a target token is seen only by itself and later positions
    before, after = _logits_after_changing(model, ids, 10, attn_mask=mask, is_causal=False)
    torch.testing.assert_close(after[:, :10], before[:, :10], atol=1e-6, rtol=0)
    assert (after[:, 10:] - before[:, 10:]).abs().amax() > 1e-3
    # an explicit causal mask (prefix 0) gives the is_causal fast path's result
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids, attn_mask=models.prefix_lm_mask(0, ids.shape[1]), is_causal=False),
            model(ids),
            atol=1e-5,
            rtol=1e-5,
        )


def test_gqa_runs_and_equals_mha_with_repeated_kv_heads():
    gqa = _debug(n_kv_heads=2)
    assert gqa.blocks[0].attn.k_proj.weight.shape == (2 * 16, 64)
    ids = _ids(gqa)
    assert gqa(ids).shape == (2, 16, 256)
    assert _debug(n_kv_heads=1)(ids).shape == (2, 16, 256)
    # Query head h reads kv head h // 2: an MHA model whose k/v heads are those, repeated, is the same model.
    mha = _debug()
    state = gqa.state_dict()
    for key in list(state):
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            state[key] = state[key].view(2, 16, 64).repeat_interleave(2, dim=0).reshape(4 * 16, 64)
    mha.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(mha(ids), gqa(ids), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- save / load


@pytest.mark.parametrize("overrides", [{}, {"n_kv_heads": 2, "tie_embeddings": False}])
def test_save_load_round_trip_is_exact(tmp_path, overrides):
    model = _debug(**overrides).eval()
    ids = _ids(model)
    models.save_pretrained(model, model.cfg, tmp_path / "export")
    loaded, cfg = models.load_pretrained(tmp_path / "export")
    assert cfg == model.cfg
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids), model(ids))
    with safe_open(str(tmp_path / "export" / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert ("lm_head.weight" in keys) == (not cfg.tie_embeddings)
    if cfg.tie_embeddings:
        assert loaded.lm_head.weight is loaded.tok_emb.weight
    assert models.num_params(loaded) == models.num_params(model)
    assert loaded.rotary.cos.dtype == torch.float32 and loaded.rotary.cos.device.type == "cpu"


def test_save_load_keeps_bf16_and_rejects_foreign_keys(tmp_path):
    model = _debug().to(torch.bfloat16)
    models.save_pretrained(model.state_dict(), model.cfg, tmp_path / "bf16")
    loaded, _ = models.load_pretrained(tmp_path / "bf16")
    assert loaded.tok_emb.weight.dtype == torch.bfloat16
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(TypeError, match="ResolvedModelConfig"):
        models.save_pretrained(model, ModelConfig(preset="debug"), tmp_path / "bad")
    wrapped = {f"module.{k}": v for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="missing"):
        models.save_pretrained(wrapped, model.cfg, tmp_path / "bad")


# ---------------------------------------------------------------- sampling


def test_greedy_generate_matches_argmax_loop_and_crops_context():
    model = _debug(max_seq_len=8)
    ids = _ids(model, seq_len=5)
    out = models.generate(model, ids, max_new_tokens=10, temperature=0.0)  # runs past max_seq_len
    assert out.shape == (2, 15) and torch.equal(out[:, :5], ids)
    expected = ids
    with torch.no_grad():
        for _ in range(10):
            nxt = model(expected[:, -8:])[:, -1].argmax(dim=-1, keepdim=True)
            expected = torch.cat((expected, nxt), dim=1)
    assert torch.equal(out, expected)
    assert model.training  # mode restored


def test_sampled_generate_is_reproducible_with_a_generator_and_stops_at_eos():
    model = _debug()
    ids = _ids(model, seq_len=4)
    a = models.generate(model, ids, max_new_tokens=6, top_k=5, generator=torch.Generator().manual_seed(3))
    b = models.generate(model, ids, max_new_tokens=6, top_k=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (2, 10)
    eos = int(models.generate(model, ids, max_new_tokens=1, temperature=0.0)[0, -1])
    out = models.generate(model, ids[:1], max_new_tokens=6, temperature=0.0, eos_id=eos)
    assert out.shape == (1, 5) and out[0, -1] == eos


# ---------------------------------------------------------------- FLOPs and training


def test_flops_per_token_matches_hand_calculation_for_debug():
    # debug: d=64, L=2, ffn=192, V=256. Matmul params N = L (4 d^2 + 3 d ffn) + d V (LM head)
    n_matmul = 2 * (4 * 64 * 64 + 3 * 64 * 192) + 64 * 256
    assert n_matmul == 122_880
    expected = 6 * n_matmul + 12 * 2 * 64 * 128
    assert expected == 933_888
    assert models.flops_per_token("debug", 128) == expected
    # the LM head counts whether or not it is tied; fewer kv heads mean fewer FLOPs
    assert models.flops_per_token({"preset": "debug", "tie_embeddings": False}, 128) == expected
    assert models.flops_per_token({"preset": "debug", "n_kv_heads": 1}, 128) == expected - 6 * 2 * 2 * 64 * 48


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = models.build("tiny")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.cfg.vocab_size, (4, 33), generator=g)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(50):
        logits = model(inputs)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(model.cfg.vocab_size), rel=0.1)  # starts near uniform
    assert losses[-1] < 0.5 * losses[0], losses[::10]
