"""KV-cache decoding (models.decoder.KVCache, DecoderLM.forward(cache=...), generate(use_cache=...)), Llama 3
rotary scaling, and the decoder pyfunc (token roles, signature with sampling parameters)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import models
from models import ResolvedModelConfig
from models.config import RopeScaling
from models.decoder import DecoderLM, rotary_inv_freq


def _model(**overrides) -> DecoderLM:
    torch.manual_seed(0)
    return models.build({"preset": "debug", "n_kv_heads": 2, "init_std": 0.1, **overrides})


def _ids(batch: int, seq: int, vocab: int = 256, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- KV cache


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa2", "mqa"])
def test_cached_greedy_generation_equals_the_uncached_one(n_kv_heads):
    model = _model(n_kv_heads=n_kv_heads)
    for seq in (1, 5, 17):
        ids = _ids(3, seq, seed=seq)
        ref = models.generate(model, ids, max_new_tokens=40, temperature=0.0, use_cache=False)
        out = models.generate(model, ids, max_new_tokens=40, temperature=0.0)
        assert out.shape == (3, seq + 40) and torch.equal(out, ref)
    assert model.training  # mode restored


def test_cached_generation_stops_at_eos_like_the_uncached_one():
    model = _model()
    ids = _ids(2, 4)
    eos = int(models.generate(model, ids, max_new_tokens=3, temperature=0.0)[0, -1])
    ref = models.generate(model, ids, max_new_tokens=12, temperature=0.0, eos_id=eos, use_cache=False)
    out = models.generate(model, ids, max_new_tokens=12, temperature=0.0, eos_id=eos)
    assert torch.equal(out, ref)


def test_generation_past_max_seq_len_falls_back_to_the_sliding_window():
    model = _model(max_seq_len=16)
    ids = _ids(2, 6)
    ref = models.generate(model, ids, max_new_tokens=30, temperature=0.0, use_cache=False)
    out = models.generate(model, ids, max_new_tokens=30, temperature=0.0)
    assert out.shape == (2, 36) and torch.equal(out, ref)
    long_prompt = _ids(1, 20)  # longer than max_seq_len from the start
    greedy = {"max_new_tokens": 3, "temperature": 0.0}
    assert torch.equal(models.generate(model, long_prompt, **greedy),
                       models.generate(model, long_prompt, **greedy, use_cache=False))


def test_sampled_generation_is_reproducible_with_the_cache():
    model = _model()
    ids = _ids(2, 3)
    a = models.generate(model, ids, max_new_tokens=10, top_k=5, generator=torch.Generator().manual_seed(3))
    b = models.generate(model, ids, max_new_tokens=10, top_k=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_cached_forward_in_chunks_matches_the_full_forward():
    model = _model().eval()
    ids = _ids(2, 30)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, capacity=32)
        parts = [model(ids[:, a:b], cache=cache) for a, b in ((0, 7), (7, 8), (8, 20), (20, 30))]
    assert cache.length == 30
    assert float((torch.cat(parts, dim=1) - full).abs().max()) < 1e-5


def test_cache_misuse_is_refused():
    model = _model()
    cache = model.new_cache(1, capacity=4)
    with pytest.raises(ValueError, match="model.eval"):
        model(_ids(1, 2), cache=cache)
    model.eval()
    with pytest.raises(ValueError, match="is_causal=True"):
        model(_ids(1, 2), cache=cache, is_causal=False)
    with pytest.raises(ValueError, match="do not fit the KVCache"):
        model(_ids(1, 5), cache=cache)
    with pytest.raises(ValueError, match="do not fit the KVCache"):
        model(_ids(2, 1), cache=cache)
    with pytest.raises(ValueError, match="capacity=200"):
        model.new_cache(1, capacity=200)


# ---------------------------------------------------------------- Llama 3 rotary scaling


def test_llama3_scaling_keeps_high_divides_low_and_blends_middle_frequencies():
    scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64)
    plain = rotary_inv_freq(64, theta=10000.0)
    scaled = rotary_inv_freq(64, theta=10000.0, scaling=scaling)
    wavelength = 2 * math.pi / plain
    short, long = wavelength < 64 / 4, wavelength > 64 / 1
    assert short.any() and long.any() and (~short & ~long).any()
    assert torch.equal(scaled[short], plain[short])
    assert torch.allclose(scaled[long], plain[long] / 8)
    middle = ~short & ~long
    assert ((scaled[middle] < plain[middle]) & (scaled[middle] > plain[middle] / 8)).all()


def test_rope_scaling_is_optional_in_config_files_and_validated():
    cfg = models.resolve_config("debug")
    old = json.loads(cfg.model_dump_json())
    del old["rope_scaling"]  # a model_config.json written before the field existed
    assert ResolvedModelConfig.model_validate(old) == cfg and cfg.rope_scaling is None
    spec = {"preset": "debug", "rope_scaling": {"factor": 8, "low_freq_factor": 1, "high_freq_factor": 4,
                                                "original_max_position_embeddings": 32}}
    scaled = models.resolve_config(spec)
    assert ResolvedModelConfig.model_validate_json(scaled.model_dump_json()) == scaled
    assert models.resolve_config(scaled) == scaled
    with pytest.raises(ValueError, match="high_freq_factor=1.0 .* allowed: high_freq_factor > low_freq"):
        models.resolve_config({**spec, "rope_scaling": {**spec["rope_scaling"], "high_freq_factor": 1.0}})
    with pytest.raises(ValueError, match="rope_type"):
        models.resolve_config({**spec, "rope_scaling": {**spec["rope_scaling"], "rope_type": "yarn"}})


# ---------------------------------------------------------------- pyfunc


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A native export folder: debug model + byte-level tokenizer, no tokenizer_config.json."""
    from data.tokenizer import train_tokenizer

    texts = ["the quick brown fox jumps over the lazy dog", "hello world"] * 20
    tok = train_tokenizer(texts, vocab_size=300, special_tokens=["<|bos|>"])
    folder = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = models.build({"preset": "debug", "n_kv_heads": 2}, vocab_size=tok.get_vocab_size(),
                         max_seq_len=64)
    models.save_pretrained(model, model.cfg, folder)
    tok.save(str(folder / "tokenizer.json"))
    return folder


class _Context:
    def __init__(self, folder):
        self.artifacts = {"model_dir": str(folder), "tokenizer": str(folder / "tokenizer.json")}


def test_pyfunc_reads_token_roles_and_prepends_bos(export_dir, tmp_path):
    from models.pyfunc import DecoderLMPyfunc

    py = DecoderLMPyfunc()
    py.load_context(_Context(export_dir))  # no tokenizer_config.json: eos <|eos|>, no BOS
    assert (py.eos_id, py.bos_id) == (0, None)
    assert py.encode("hello") == py.tokenizer.encode("hello").ids
    assert py.encode("") == [0]
    folder = tmp_path / "with_roles"
    folder.mkdir()
    for name in ("model.safetensors", "model_config.json", "tokenizer.json"):
        (folder / name).write_bytes((export_dir / name).read_bytes())
    roles = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>", "add_bos_token": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(roles))
    py.load_context(_Context(folder))
    bos = py.tokenizer.token_to_id("<|bos|>")
    assert py.bos_id == bos and py.encode("hello") == [bos, *py.tokenizer.encode("hello").ids]
    (folder / "tokenizer_config.json").write_text(json.dumps({**roles, "bos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match="bos_token='<\\|nope\\|>'"):
        py.load_context(_Context(folder))


def test_pyfunc_signature_params_reach_generation(export_dir, tmp_path):
    import mlflow.pyfunc

    from models.pyfunc import DECODER_PARAMS, DecoderLMPyfunc, decoder_signature

    sig = decoder_signature()
    assert [c.type.name for c in sig.inputs.inputs] == ["string"]
    assert {p.name: p.default for p in sig.params.params} == DECODER_PARAMS
    assert {p.name: p.dtype.name for p in sig.params.params} == {
        "max_new_tokens": "long", "temperature": "double", "top_k": "long", "seed": "long"}
    path = tmp_path / "pyfunc"
    mlflow.pyfunc.save_model(
        path, python_model=DecoderLMPyfunc(), signature=sig, pip_requirements=["torch"],
        artifacts={"model_dir": str(export_dir), "tokenizer": str(export_dir / "tokenizer.json")},
    )
    loaded = mlflow.pyfunc.load_model(str(path))
    greedy = {"max_new_tokens": 6, "temperature": 0.0}
    a = loaded.predict(["the quick", "hello"], params=greedy)
    assert len(a) == 2 and a == loaded.predict(["the quick", "hello"], params={**greedy, "seed": 7})
    assert loaded.predict(["the quick"], params={"max_new_tokens": 0}) == [""]
    import pandas as pd

    assert loaded.predict(pd.DataFrame({"prompt": ["the quick", "hello"]}), params=greedy) == a
    assert loaded.predict({"prompt": ["the quick", "hello"]}, params=greedy) == a
    assert loaded.predict("the quick", params=greedy) == a[:1]
    sampled = {"max_new_tokens": 12, "temperature": 1.5, "top_k": 0}
    s1 = loaded.predict(["the quick"], params={**sampled, "seed": 1})
    assert s1 == loaded.predict(["the quick"], params={**sampled, "seed": 1})
    seeds = {loaded.predict(["the quick"], params={**sampled, "seed": s})[0] for s in range(2, 6)}
    assert len(seeds) > 1  # the seed reaches the sampler
    # the greedy text is what generate gives directly
    py = DecoderLMPyfunc()
    py.load_context(_Context(export_dir))
    ids = torch.tensor([py.encode("the quick")])
    out = models.generate(py.model, ids, max_new_tokens=6, temperature=0.0, eos_id=py.eos_id)
    new = out[0, ids.shape[1]:].tolist()
    new = new[: new.index(0)] if 0 in new else new
    assert a[0] == py.tokenizer.decode(new)
