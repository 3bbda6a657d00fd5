"""Hugging Face Llama format <-> native export folder (models.hf, models.hf_io): tiny random models built
from a LlamaConfig (nothing downloaded) go through import and export, and transformers, our DecoderLM and
the converted files must agree on logits and tokenization. Runs with transformers 4.4x and 5.x."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers  # noqa: E402
from tokenizers import models as tok_models  # noqa: E402

import models  # noqa: E402
from models.config import RopeScaling  # noqa: E402
from models.hf import (  # noqa: E402
    HFFormatError,
    from_hf_config,
    from_hf_state,
    to_hf_config,
    to_hf_state,
)
from models.hf_io import (  # noqa: E402
    TokenRoles,
    export_hf_folder,
    import_hf_folder,
    read_hf_folder,
    read_token_roles,
)
from models.io import load_pretrained, save_pretrained  # noqa: E402

TEXTS = ["the quick brown fox jumps over the lazy dog", "hello world, hello tokenizer", "def f(x): return x"]
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


def _bpe(specials: list[str], vocab_size: int = 300) -> Tokenizer:
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 10, trainer=trainer)
    return tok


def _hf_tokenizer(*, add_bos: bool = True, eos: str | None = "</s>"):
    """A byte-level BPE wrapped in PreTrainedTokenizerFast: <s>=0, </s>=1, <pad>=2; BOS prepended when
    add_bos (by the tokenizer.json post-processor, which is what both transformers 4 and 5 apply)."""
    tok = _bpe(["<s>", "</s>", "<pad>"])
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B:1",
                                                           special_tokens=[("<s>", 0)])
    kwargs = {"add_bos_token": True} if add_bos else {}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=eos,
                                                pad_token="<pad>", **kwargs)


def _hf_model(folder: Path, *, tie: bool = False, vocab: int = 300, rope_scaling: dict | None = None,
              max_shard_size: str | None = None, tokenizer=None, **overrides):
    """A random LlamaForCausalLM (GQA 4/2, rope_theta 500000) saved with its tokenizer into ``folder``."""
    torch.manual_seed(0)
    fields = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rope_theta=500000.0, rms_norm_eps=1e-5, initializer_range=0.1, tie_word_embeddings=tie,
                  bos_token_id=0, eos_token_id=1, pad_token_id=2, rope_scaling=rope_scaling)
    fields.update(overrides)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    (tokenizer or _hf_tokenizer()).save_pretrained(folder)
    return model


def _ids(vocab: int = 280, seq: int = 40) -> torch.Tensor:
    return torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _logits_hf(model_or_dir, ids: torch.Tensor) -> torch.Tensor:
    model = model_or_dir
    if not isinstance(model, torch.nn.Module):
        model = transformers.AutoModelForCausalLM.from_pretrained(model_or_dir, dtype=torch.float32) \
            if int(transformers.__version__.split(".")[0]) >= 5 else \
            transformers.AutoModelForCausalLM.from_pretrained(model_or_dir, torch_dtype=torch.float32)
    return model.eval()(ids).logits


@torch.no_grad()
def _logits_native(native: Path, ids: torch.Tensor) -> torch.Tensor:
    model, _ = load_pretrained(native)
    return model.eval()(ids)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _round_trip(tmp_path: Path, model, ids: torch.Tensor) -> tuple[Path, Path]:
    """import -> export; the original, transformers on the export and our DecoderLM agree."""
    native, out = tmp_path / "native", tmp_path / "out"
    import_hf_folder(tmp_path / "hf", native)
    export_hf_folder(native, out)
    ref = _logits_hf(model, ids)
    assert _max_diff(_logits_hf(out, ids), ref) <= 1e-4
    assert _max_diff(_logits_native(native, ids), ref) <= 1e-4
    return native, out


# ---------------------------------------------------------------- round trips


def test_round_trip_gqa_untied_logits_equal_and_rotary_needs_no_permutation(tmp_path):
    model = _hf_model(tmp_path / "hf")
    ids = _ids()
    native, out = _round_trip(tmp_path, model, ids)
    cfg = json.loads((native / "model_config.json").read_text())
    got = (cfg["n_kv_heads"], cfg["tie_embeddings"], cfg["rope_theta"], cfg["norm_eps"])
    assert got == (2, False, 500000.0, 1e-5)
    written = json.loads((out / "config.json").read_text())
    assert written["tie_word_embeddings"] is False and written["architectures"] == ["LlamaForCausalLM"]
    # The test can tell layouts apart: the interleaved (2i, 2i+1) layout gives other logits.
    ours, _ = load_pretrained(native)
    hd = ours.cfg.head_dim
    perm = torch.cat((torch.arange(0, hd, 2), torch.arange(1, hd, 2)))
    with torch.no_grad():
        for block in ours.blocks:
            for proj, heads in ((block.attn.q_proj, 4), (block.attn.k_proj, 2)):
                w = proj.weight.view(heads, hd, -1)
                proj.weight.copy_(w[:, perm].reshape(heads * hd, -1))
        assert _max_diff(ours.eval()(ids), _logits_hf(model, ids)) > 1e-3


def test_round_trip_tied_embeddings(tmp_path):
    model = _hf_model(tmp_path / "hf", tie=True)
    native, out = _round_trip(tmp_path, model, _ids())
    with safe_open(str(native / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


def test_import_of_a_sharded_checkpoint(tmp_path):
    model = _hf_model(tmp_path / "hf", max_shard_size="50KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    _round_trip(tmp_path, model, _ids())


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    model = _hf_model(tmp_path / "hf", rope_scaling=dict(LLAMA3))
    native, out = _round_trip(tmp_path, model, _ids(seq=60))
    cfg = models.ResolvedModelConfig.model_validate_json((native / "model_config.json").read_text())
    assert cfg.rope_scaling == RopeScaling(**{k: v for k, v in LLAMA3.items() if k != "rope_type"})
    written = json.loads((out / "config.json").read_text())
    assert written["rope_scaling"] == LLAMA3 and written["rope_theta"] == 500000.0
    # the scaling matters for these sizes: without it the logits differ
    plain, _ = load_pretrained(native)
    plain.rotary.scaling = None
    plain.rotary._build(device=None)
    with torch.no_grad():
        assert _max_diff(plain.eval()(_ids(seq=60)), _logits_hf(model, _ids(seq=60))) > 1e-4


def _dialect(d: dict) -> str:
    return "5" if "rope_parameters" in d else "4"


def _as_dialect(d: dict, dialect: str) -> dict:
    """The same config written the transformers-4 way (rope_theta / rope_scaling / torch_dtype) or the 5 way
    (rope_parameters / dtype / head_dim)."""
    d = dict(d)
    if _dialect(d) == "5":
        params = dict(d.pop("rope_parameters"))
        theta = params.pop("rope_theta")
        rope_type = params.get("rope_type", "default")
        four = {"rope_theta": theta, "rope_scaling": None if rope_type == "default" else params,
                "torch_dtype": d.pop("dtype", "float32")}
        d.pop("head_dim", None)
        d.update(four)
    else:
        scaling = dict(d.pop("rope_scaling") or {"rope_type": "default"})
        scaling["rope_theta"] = d.pop("rope_theta")
        d.update({"rope_parameters": scaling, "dtype": d.pop("torch_dtype", "float32"),
                  "head_dim": d["hidden_size"] // d["num_attention_heads"]})
    assert _dialect(d) == dialect
    return d


@pytest.mark.parametrize("rope_scaling", [None, LLAMA3], ids=["plain", "llama3"])
def test_both_config_dialects_import_alike(tmp_path, rope_scaling):
    model = _hf_model(tmp_path / "hf", rope_scaling=dict(rope_scaling) if rope_scaling else None)
    path = tmp_path / "hf" / "config.json"
    written = json.loads(path.read_text())
    other = "4" if _dialect(written) == "5" else "5"
    rewritten = _as_dialect(written, other)
    assert from_hf_config(rewritten) == from_hf_config(written)
    path.write_text(json.dumps(rewritten))
    native, out = _round_trip(tmp_path, model, _ids(seq=60))
    assert from_hf_config(json.loads((out / "config.json").read_text())) == from_hf_config(written)


def test_padded_embedding_is_kept(tmp_path):
    tok = _hf_tokenizer()
    assert tok.backend_tokenizer.get_vocab_size(with_added_tokens=True) <= 300 < 320
    model = _hf_model(tmp_path / "hf", vocab=320, tokenizer=tok)
    native, out = _round_trip(tmp_path, model, _ids(vocab=320))
    assert json.loads((native / "model_config.json").read_text())["vocab_size"] == 320
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 320


def test_tokenizer_round_trip_encodes_alike_and_keeps_bos(tmp_path):
    source_tok = _hf_tokenizer(add_bos=True)
    _hf_model(tmp_path / "hf", tokenizer=source_tok)
    native, out = tmp_path / "native", tmp_path / "out"
    import_hf_folder(tmp_path / "hf", native)
    assert read_token_roles(native) == TokenRoles(bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                                  add_bos_token=True)
    export_hf_folder(native, out)
    exported = transformers.AutoTokenizer.from_pretrained(out)
    for text in [*TEXTS, "unseen wörds ✓"]:
        expected = source_tok(text)["input_ids"]
        assert expected[0] == 0  # BOS
        assert exported(text)["input_ids"] == expected
        assert exported.decode(expected, skip_special_tokens=True) == text
    assert (exported.bos_token, exported.eos_token, exported.pad_token) == ("<s>", "</s>", "<pad>")
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast" and tc["add_bos_token"] is True
    assert json.loads((out / "special_tokens_map.json").read_text())["eos_token"] == "</s>"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 1


def test_roles_fall_back_to_special_tokens_map_and_generation_config(tmp_path):
    _hf_model(tmp_path / "hf", tokenizer=_hf_tokenizer(add_bos=False))
    hf = tmp_path / "hf"
    tc = json.loads((hf / "tokenizer_config.json").read_text())
    for role in ("bos_token", "eos_token", "pad_token"):
        tc.pop(role, None)
    (hf / "tokenizer_config.json").write_text(json.dumps(tc))
    (hf / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "<pad>"}}))
    _, _, roles = read_hf_folder(hf)
    assert roles == TokenRoles(bos_token=None, eos_token="</s>", pad_token="<pad>", add_bos_token=False)


# ---------------------------------------------------------------- refusals


def _refused(tmp_path: Path, field: str, *, src: Path | None = None) -> None:
    dest = tmp_path / "dest"
    with pytest.raises(HFFormatError, match=field) as info:
        import_hf_folder(src or tmp_path / "hf", dest)
    assert isinstance(info.value, ValueError)
    assert not dest.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dest")]


def _edit_config(folder: Path, **fields) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def test_refuses_unsupported_model_type(tmp_path):
    _hf_model(tmp_path / "hf")
    _edit_config(tmp_path / "hf", model_type="gpt2")
    _refused(tmp_path, "model_type='gpt2'.*allowed: one of \\['llama', 'mistral'\\]")


def test_refuses_attention_bias(tmp_path):
    _hf_model(tmp_path / "hf")
    _edit_config(tmp_path / "hf", attention_bias=True)
    _refused(tmp_path, "config.json: attention_bias=True is not supported; allowed: false")


def test_refuses_missing_weight_file(tmp_path):
    _hf_model(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    _refused(tmp_path, "weight file model.safetensors .* not found")


def test_refuses_missing_shard(tmp_path):
    _hf_model(tmp_path / "hf", max_shard_size="50KB")
    shard = sorted((tmp_path / "hf").glob("model-*.safetensors"))[-1]
    shard.unlink()
    _refused(tmp_path, f"shard file\\(s\\) \\['{shard.name}'\\] not found")


def test_refuses_tokenizer_without_eos(tmp_path):
    _hf_model(tmp_path / "hf", tokenizer=_hf_tokenizer(eos=None), eos_token_id=None)
    gen = tmp_path / "hf" / "generation_config.json"
    if gen.exists():
        kept = {k: v for k, v in json.loads(gen.read_text()).items() if k != "eos_token_id"}
        gen.write_text(json.dumps(kept))
    _refused(tmp_path, "no EOS token.*eos_token")


def test_refuses_tokenizer_larger_than_embedding(tmp_path):
    _hf_model(tmp_path / "hf", vocab=200)
    _refused(tmp_path, "tokenizer.json: the tokenizer has \\d+ tokens but config.json vocab_size=200")


def test_refuses_unknown_weight_names(tmp_path):
    _hf_model(tmp_path / "hf")
    from safetensors.torch import load_file, save_file

    path = tmp_path / "hf" / "model.safetensors"
    state = load_file(str(path))
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(state, str(path), metadata={"format": "pt"})
    _refused(tmp_path, "no counterpart, e.g. \\['model.layers.0.self_attn.q_proj.bias'\\]")


def test_refuses_a_non_empty_destination(tmp_path):
    _hf_model(tmp_path / "hf")
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "keep.txt").write_text("x")
    with pytest.raises(HFFormatError, match="not empty"):
        import_hf_folder(tmp_path / "hf", tmp_path / "dest")
    import_hf_folder(tmp_path / "hf", tmp_path / "native")
    with pytest.raises(HFFormatError, match="not empty"):
        export_hf_folder(tmp_path / "native", tmp_path / "dest")
    assert [p.name for p in (tmp_path / "dest").iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    export_hf_folder(tmp_path / "native", tmp_path / "empty")  # an empty directory is fine
    assert (tmp_path / "empty" / "config.json").is_file()


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"model_type": "gpt_neox"}, "model_type='gpt_neox'"),
        ({"model_type": "mistral", "sliding_window": 4096}, "sliding_window=4096.*allowed: null"),
        ({"mlp_bias": True}, "mlp_bias=True"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'.*allowed: 'silu'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type='yarn'.*llama3"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
         "rope_parameters.rope_type='linear'"),
        ({"head_dim": 32}, "head_dim=32.*hidden_size / num_attention_heads = 16"),
        ({"hidden_size": 60, "num_attention_heads": 4, "head_dim": None}, "head_dim=15.*even"),
        ({"num_key_value_heads": 3}, "num_key_value_heads=3.*divisor of num_attention_heads=4"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling.low_freq_factor"),
        ({"num_hidden_layers": None}, "num_hidden_layers=None.*positive integer"),
    ],
)
def test_from_hf_config_refusals_name_the_field(fields, named):
    base = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64}
    with pytest.raises(HFFormatError, match=f"my/config.json: .*{named}"):
        from_hf_config({**base, **fields}, source="my/config.json")


def test_from_hf_config_defaults_and_mistral():
    cfg = from_hf_config({"model_type": "mistral", "vocab_size": 100, "hidden_size": 64,
                          "intermediate_size": 96,
                          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
                          "max_position_embeddings": 64, "sliding_window": None})
    assert (cfg.n_kv_heads, cfg.tie_embeddings, cfg.rope_theta, cfg.norm_eps, cfg.rope_scaling) == (
        1, False, 10000.0, 1e-6, None)


def test_config_and_names_map_both_ways():
    cfg = models.resolve_config({"preset": "debug", "n_kv_heads": 2, "tie_embeddings": False,
                                 "rope_scaling": {k: v for k, v in LLAMA3.items() if k != "rope_type"}})
    d = to_hf_config(cfg, bos_id=None, eos_id=0, pad_id=1)
    assert from_hf_config(d) == cfg.model_copy(update={"dropout": 0.0})
    assert d["rope_scaling"]["rope_type"] == "llama3" and d["attention_bias"] is False
    state = models.build(cfg).state_dict()
    hf = to_hf_state(state, cfg)
    assert "model.layers.1.self_attn.k_proj.weight" in hf and "lm_head.weight" in hf
    back = from_hf_state(hf, cfg)
    assert back.keys() == state.keys() and all(back[k] is state[k] for k in state)
    with pytest.raises(HFFormatError, match="missing, e.g. \\['model.norm.weight'\\]"):
        from_hf_state({k: v for k, v in hf.items() if k != "model.norm.weight"}, cfg)
    bad = dict(hf)
    bad["model.norm.weight"] = torch.ones(3)
    with pytest.raises(HFFormatError, match="model.norm.weight has shape \\[3\\]; allowed: \\[64\\]"):
        from_hf_state(bad, cfg)
    with pytest.raises(HFFormatError, match="dtype='int8'"):
        to_hf_config(cfg, bos_id=None, eos_id=0, pad_id=1, dtype="int8")


# ---------------------------------------------------------------- export


def test_sharded_export_index_is_consistent_and_loads(tmp_path):
    model = _hf_model(tmp_path / "hf")
    native, out = tmp_path / "native", tmp_path / "out"
    import_hf_folder(tmp_path / "hf", native)
    export_hf_folder(native, out, max_shard_bytes=40_000)
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and all(p.name.endswith(f"-of-{len(shards):05d}.safetensors") for p in shards)
    total, seen = 0, {}
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                total += t.numel() * t.element_size()
                seen[name] = shard.name
    assert index["metadata"]["total_size"] == total
    assert index["weight_map"] == seen
    assert _max_diff(_logits_hf(out, _ids()), _logits_hf(model, _ids())) <= 1e-4


def test_project_model_exports_to_transformers_and_generates(tmp_path):
    from data.tokenizer import train_tokenizer

    tok = train_tokenizer(TEXTS * 20, vocab_size=300)
    native = tmp_path / "native"
    torch.manual_seed(0)
    model = models.build({"preset": "debug", "n_kv_heads": 2, "init_std": 0.1},
                         vocab_size=tok.get_vocab_size(), max_seq_len=64)
    save_pretrained(model, model.cfg, native)
    tok.save(str(native / "tokenizer.json"))  # no tokenizer_config.json: the older-export defaults apply
    before = (native / "tokenizer.json").read_text()
    out = export_hf_folder(native, tmp_path / "hf")
    assert (native / "tokenizer.json").read_text() == before
    ids = _ids(vocab=tok.get_vocab_size(), seq=30)
    with torch.no_grad():
        ours = model.eval()(ids)
    assert _max_diff(_logits_hf(out, ids), ours) <= 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (hf_tok.eos_token, hf_tok.pad_token, hf_tok.bos_token) == ("<|eos|>", "<|pad|>", None)
    for text in TEXTS:
        assert hf_tok(text)["input_ids"] == tok.encode(text).ids
    generator = transformers.pipeline("text-generation", model=str(out), tokenizer=str(out), device="cpu")
    text = generator("the quick", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith("the quick") and len(text) > len("the quick")
    # greedy continuation agrees with ours
    prompt = torch.tensor([tok.encode("the quick").ids])
    ours_ids = models.generate(model, prompt, max_new_tokens=8, temperature=0.0)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out)
    hf_ids = hf_model.generate(prompt, max_new_tokens=8, do_sample=False,
                               attention_mask=torch.ones_like(prompt))
    assert torch.equal(ours_ids[:, : hf_ids.shape[1]], hf_ids)  # transformers may stop at EOS, ours runs on
