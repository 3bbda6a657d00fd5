"""A released model's tokenizer in `rpt data prepare`: special-token roles, BOS packing, added tokens.

Small stand-ins are built here with the `tokenizers` library (no network): a Llama-style folder
(`<unk>`, `<s>`, `</s>`, BOS prepended by the post-processor, `tokenizer_config.json` saying bos `<s>`,
eos `</s>`, add_bos_token true, no pad) and a GPT-2-style `tokenizer.json` whose only special token is
`<|endoftext|>`. The Ray-free pieces of `data/prepare.py` are used directly: loading and role
resolution, the written files, the manifest's tokenizer info and the `TokenizeAndPack` UDF.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import objectives
from data import pack
from data.manifest import Manifest, TokenizerInfo
from data.prepare import PrepareConfig, TokenizeAndPack, TokenizerChoice, load_given_tokenizer
from data.tokenizer import (
    EOS_TOKEN,
    PAD_TOKEN,
    TokenizerRoles,
    resolve_roles,
    special_token_ids,
    tokenizer_sha256,
    train_tokenizer,
)

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "pack documents into rows of tokens for the model",
    "a literal </s> or <|endoftext|> in a document is text",
    "héllo wörld ✓",
] * 20
DOCS = ["the lazy dog sleeps", "rows of tokens", "", "a literal </s> stays text", "héllo ✓ fox"]
ROW_LEN = 9


def _byte_bpe(specials: list[str], vocab_size: int = 360) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXTS, trainer=trainer)
    return tok


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


@pytest.fixture
def llama_dir(tmp_path) -> Path:
    """A Llama-style Hugging Face folder: <unk> 0, <s> 1, </s> 2, <|im_end|> 3; BOS via the post-processor."""
    tok = _byte_bpe(["<unk>", "<s>", "</s>", "<|im_end|>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    folder = tmp_path / "llama"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    added = {"__type": "AddedToken", "lstrip": False, "normalized": False, "rstrip": False}
    _write_json(
        folder / "tokenizer_config.json",
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": {**added, "content": "<s>"},
            "eos_token": {**added, "content": "</s>"},
            "unk_token": {**added, "content": "<unk>"},
            "pad_token": None,
            "tokenizer_class": "LlamaTokenizer",
        },
    )
    special_map = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    _write_json(folder / "special_tokens_map.json", special_map)
    return folder


@pytest.fixture
def gpt2_file(tmp_path) -> Path:
    """A GPT-2-style tokenizer.json alone: the only special token is <|endoftext|> (id 0)."""
    folder = tmp_path / "gpt2"
    folder.mkdir()
    _byte_bpe(["<|endoftext|>"]).save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def _config(tmp_path: Path, tokenizer: Path | None, **over) -> PrepareConfig:
    return PrepareConfig(corpus="builtin:pydoc", out_dir=tmp_path / "out", tokenizer=tokenizer, **over)


def _pack(tok_path: Path, roles: TokenizerRoles, docs: list[str] = DOCS) -> np.ndarray:
    """All the token ids the UDF packs for `docs` (one train batch), in stream order."""
    udf = TokenizeAndPack(
        str(tok_path), row_len=ROW_LEN, eos_id=roles.eos_id, pad_id=roles.pad_id, threshold=0.0,
        bos_id=roles.prepend_id,
    )  # fmt: skip
    out = udf(pa.table({"text": docs, "u_split": np.full(len(docs), 0.5)}))
    assert (out["split"] == 0).all()
    rows, n_valid = out["tokens"], out["n_valid"]
    assert (n_valid[:-1] == ROW_LEN).all()
    return np.concatenate([r[:n] for r, n in zip(rows, n_valid, strict=True)])


def _setup_args(info: TokenizerInfo) -> dict:
    """`TokenObjective.setup` keywords from a manifest's tokenizer info."""
    return {
        "special_tokens": info.special_tokens, "vocab_size": info.vocab_size,
        "eos_id": info.eos_id, "pad_id": info.pad_id,
    }  # fmt: skip


def _encode(tok_path: Path, text: str) -> list[int]:
    tok = Tokenizer.from_file(str(tok_path))
    tok.encode_special_tokens = True
    return tok.encode(text, add_special_tokens=False).ids


# ---- a Llama-style folder: BOS + EOS, no PAD ------------------------------------------------------


def test_hf_folder_roles_come_from_tokenizer_config(tmp_path, llama_dir):
    choice = load_given_tokenizer(_config(tmp_path, llama_dir))
    assert choice.roles == TokenizerRoles(
        eos_token="</s>", eos_id=2, pad_token=None, pad_id=2, bos_token="<s>", bos_id=1, add_bos_token=True
    )
    assert choice.roles.pads_with_eos and choice.roles.prepend_id == 1 and choice.added == ()
    assert choice.source == llama_dir / "tokenizer.json"
    assert choice.roles.to_tokenizer_config() == {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
    }


def test_packed_rows_have_bos_at_each_document_start_and_eos_at_each_end(tmp_path, llama_dir):
    choice = load_given_tokenizer(_config(tmp_path, llama_dir))
    out = tmp_path / "prepared"
    out.mkdir()
    tok_path = choice.write(out)
    # an unchanged released tokenizer is copied byte for byte; its roles go to tokenizer_config.json
    assert tokenizer_sha256(tok_path) == tokenizer_sha256(llama_dir / "tokenizer.json")
    assert json.loads((out / "tokenizer_config.json").read_text()) == choice.roles.to_tokenizer_config()

    stream = _pack(tok_path, choice.roles)
    expected = [t for doc in DOCS for t in [1, *_encode(tok_path, doc), 2]]
    assert stream.tolist() == expected
    # document by document: cut at every EOS, each piece is BOS + the document's ids
    cuts = np.flatnonzero(stream == 2)
    assert len(cuts) == len(DOCS)  # the literal "</s>" in a document is text, not a boundary
    for doc, piece in zip(DOCS, np.split(stream, cuts + 1)[:-1], strict=True):
        assert piece[0] == 1 and piece[-1] == 2 and (piece[1:-1] > 3).all()
        assert piece[1:-1].tolist() == _encode(tok_path, doc)
    # a decoded row shows the boundaries
    tok = Tokenizer.from_file(str(tok_path))
    text = tok.decode(stream.tolist(), skip_special_tokens=False)
    assert text.startswith(
        "<s>the lazy dog sleeps</s><s>rows of tokens</s><s></s><s>a literal </s> stays text</s>"
    )


def test_pad_is_eos_without_a_pad_token_and_is_recorded(tmp_path, llama_dir):
    choice = load_given_tokenizer(_config(tmp_path, llama_dir))
    tok_path = choice.write(tmp_path)
    info = choice.info(tok_path)
    assert info.pad_id == info.eos_id == 2 and info.pad_token is None
    assert (info.eos_token, info.bos_token, info.bos_id, info.add_bos) == ("</s>", "<s>", 1, True)
    assert info.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2, "<|im_end|>": 3}
    assert info.vocab_size == Tokenizer.from_file(str(tok_path)).get_vocab_size()
    assert TokenizerInfo.model_validate_json(info.model_dump_json()) == info
    assert info.roles() == choice.roles
    # the tail of a batch is padded with the pad id (EOS here) and marked by its valid length
    udf = TokenizeAndPack(str(tok_path), row_len=64, eos_id=2, pad_id=2, threshold=0.0, bos_id=1)
    out = udf(pa.table({"text": ["rows"], "u_split": [0.5]}))
    n = int(out["n_valid"][0])
    assert out["tokens"][0, n:].tolist() == [2] * (64 - n)


def test_truncation_and_padding_of_a_released_tokenizer_are_ignored(tmp_path, llama_dir):
    tok = Tokenizer.from_file(str(llama_dir / "tokenizer.json"))
    tok.enable_truncation(max_length=2)
    tok.enable_padding(pad_id=0, pad_token="<unk>", length=40)
    tok.save(str(llama_dir / "tokenizer.json"))
    choice = load_given_tokenizer(_config(tmp_path, llama_dir))
    stream = _pack(choice.write(tmp_path), choice.roles)
    plain = Tokenizer.from_file(str(llama_dir / "tokenizer.json"))
    plain.no_truncation()
    plain.no_padding()
    plain.encode_special_tokens = True
    assert stream.tolist() == [t for d in DOCS for t in [1, *plain.encode(d, add_special_tokens=False).ids, 2]]


def test_explicit_fields_override_the_folder(tmp_path, llama_dir):
    roles = load_given_tokenizer(
        _config(tmp_path, llama_dir, eos_token="<|im_end|>", pad_token="<unk>", add_bos_token=False)
    ).roles
    assert (roles.eos_token, roles.eos_id, roles.pad_token, roles.pad_id) == ("<|im_end|>", 3, "<unk>", 0)
    assert roles.bos_token == "<s>" and not roles.add_bos_token and roles.prepend_id is None
    tok_path = load_given_tokenizer(_config(tmp_path, llama_dir)).write(tmp_path)
    stream = _pack(tok_path, roles)
    assert stream.tolist() == [t for doc in DOCS for t in [*_encode(tok_path, doc), 3]]  # no BOS, EOS 3


def test_special_tokens_map_and_the_post_processor_fill_in(tmp_path, llama_dir):
    # tokenizer_config.json wins over special_tokens_map.json; without it the map is used, and BOS is
    # prepended because the tokenizer's post-processor template starts with it
    _write_json(llama_dir / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "<|im_end|>"})
    assert load_given_tokenizer(_config(tmp_path, llama_dir)).roles.eos_token == "</s>"
    (llama_dir / "tokenizer_config.json").unlink()
    roles = load_given_tokenizer(_config(tmp_path, llama_dir)).roles
    assert (roles.eos_token, roles.bos_token, roles.add_bos_token) == ("<|im_end|>", "<s>", True)
    # a tokenizer.json path reads the Hugging Face files next to it
    assert load_given_tokenizer(_config(tmp_path, llama_dir / "tokenizer.json")).roles == roles


def test_a_role_naming_an_absent_token_fails_naming_field_value_and_tokens(tmp_path, llama_dir):
    with pytest.raises(ValueError) as e:
        load_given_tokenizer(_config(tmp_path, llama_dir, eos_token="<|eot_id|>"))
    msg = str(e.value)
    assert "data.prepare.eos_token='<|eot_id|>'" in msg and "'</s>'" in msg and "<s>" in msg
    assert str(llama_dir / "tokenizer.json") in msg
    # from the folder's config: the file is named, and the field that overrides it
    _write_json(llama_dir / "tokenizer_config.json", {"eos_token": "<eos>", "pad_token": "</s>"})
    with pytest.raises(ValueError, match=r"eos_token='<eos>' in .*tokenizer_config.json.*data.prepare.eos_"):
        load_given_tokenizer(_config(tmp_path, llama_dir))
    _write_json(llama_dir / "tokenizer_config.json", {"eos_token": "</s>", "add_bos_token": True})
    (llama_dir / "special_tokens_map.json").unlink()
    with pytest.raises(ValueError, match=r"add_bos_token=True in .*data.prepare.bos_token"):
        load_given_tokenizer(_config(tmp_path, llama_dir))
    _write_json(llama_dir / "tokenizer_config.json", {"eos_token": ["</s>"]})
    with pytest.raises(ValueError, match=r"tokenizer_config.json.*eos_token=\['</s>'\].*data.prepare.eos_"):
        load_given_tokenizer(_config(tmp_path, llama_dir))


def test_a_folder_without_tokenizer_json_names_the_field(tmp_path):
    folder = tmp_path / "slow"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(b"sentencepiece")
    with pytest.raises(FileNotFoundError, match=r"data.prepare.tokenizer=.*slow.*tokenizer.json"):
        load_given_tokenizer(_config(tmp_path, folder))


# ---- a GPT-2-style tokenizer.json: <|endoftext|> only -----------------------------------------------


def test_missing_eos_says_to_set_data_prepare_eos_token(tmp_path, gpt2_file):
    with pytest.raises(ValueError) as e:
        load_given_tokenizer(_config(tmp_path, gpt2_file))
    msg = str(e.value)
    assert "set data.prepare.eos_token" in msg and "'<|endoftext|>'" in msg and str(gpt2_file) in msg
    roles = load_given_tokenizer(_config(tmp_path, gpt2_file, eos_token="<|endoftext|>")).roles
    assert roles == TokenizerRoles(eos_token="<|endoftext|>", eos_id=0, pad_token=None, pad_id=0)
    hf_config = roles.to_tokenizer_config()
    assert hf_config["bos_token"] is None and hf_config["add_bos_token"] is False
    stream = _pack(gpt2_file, roles)
    assert stream.tolist() == [t for doc in DOCS for t in [*_encode(gpt2_file, doc), 0]]


def test_extra_special_tokens_are_added_after_the_vocabulary(tmp_path, gpt2_file, caplog):
    original = Tokenizer.from_file(str(gpt2_file)).get_vocab_size()
    extra = ["<|mask|>", "<|sentinel_0|>", "<|pad|>"]
    with caplog.at_level(logging.WARNING, logger="data.prepare"):
        choice = load_given_tokenizer(
            _config(tmp_path, gpt2_file, eos_token="<|endoftext|>", pad_token="<|pad|>", special_tokens=extra)
        )
    assert choice.added == tuple(extra)
    ids = [choice.tok.token_to_id(t) for t in extra]
    assert ids == [original, original + 1, original + 2]
    assert "embedding" in caplog.text and str(original + 3) in caplog.text
    assert (choice.roles.pad_token, choice.roles.pad_id) == ("<|pad|>", original + 2)

    out = tmp_path / "prepared"
    out.mkdir()
    tok_path = choice.write(out)
    info = choice.info(tok_path)
    assert info.vocab_size == original + 3
    assert info.special_tokens == {"<|endoftext|>": 0, **dict(zip(extra, ids, strict=True))}
    reloaded = Tokenizer.from_file(str(tok_path))  # the written file holds the added tokens
    assert special_token_ids(reloaded) == info.special_tokens
    assert reloaded.encode("<|mask|>", add_special_tokens=False).ids == [original]
    # the objectives find their tokens by name and EOS / PAD by id
    mlm = objectives.get("mlm")
    mlm.setup(**_setup_args(info))
    assert mlm._ids(["<|mask|>"]) == [original] and mlm.eos_id == 0
    # preparing again from the prepared tokenizer adds nothing more
    again = load_given_tokenizer(_config(tmp_path, tok_path, special_tokens=extra))
    assert again.added == () and again.roles == choice.roles


def test_objective_tokens_missing_from_a_stock_tokenizer_name_the_fix(tmp_path, gpt2_file):
    choice = load_given_tokenizer(_config(tmp_path, gpt2_file, eos_token="<|endoftext|>"))
    info = choice.info(choice.write(tmp_path))
    with pytest.raises(ValueError, match=r"data.prepare.special_tokens: \['<\|mask\|>'\]"):
        objectives.get("mlm").setup(**_setup_args(info))


# ---- the project's own tokenizer: unchanged ---------------------------------------------------------


def test_own_tokenizer_roles_ids_and_rows_are_unchanged(tmp_path):
    tok = train_tokenizer(iter(TEXTS), 300, ["<|mask|>"])
    roles = resolve_roles(tok)
    assert roles == TokenizerRoles.project_default()
    assert (roles.eos_id, roles.pad_id, roles.bos_id, roles.prepend_id) == (0, 1, None, None)
    choice = TokenizerChoice(tok=tok, roles=roles)
    out = tmp_path / "own"
    out.mkdir()
    tok_path = choice.write(out)
    assert json.loads((out / "tokenizer_config.json").read_text()) == {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|eos|>",
        "pad_token": "<|pad|>",
        "add_bos_token": False,
        "add_eos_token": False,
    }
    info = choice.info(tok_path)
    assert info.special_tokens == special_token_ids(tok) == {EOS_TOKEN: 0, PAD_TOKEN: 1, "<|mask|>": 2}
    assert (info.eos_id, info.pad_id, info.vocab_size) == (0, 1, tok.get_vocab_size(with_added_tokens=True))
    assert (info.eos_token, info.pad_token, info.bos_token, info.bos_id, info.add_bos) == (
        EOS_TOKEN, PAD_TOKEN, None, None, False
    )  # fmt: skip
    # the same rows as packing with EOS 0 directly
    stream = _pack(tok_path, roles)
    ids = [np.asarray(_encode(tok_path, d), dtype=np.int32) for d in DOCS]
    assert stream.tolist() == pack.concat_with_eos(ids, eos_id=0).tolist()

    # given back as data.prepare.tokenizer: a byte copy, same roles, and its folder's config agrees
    given = load_given_tokenizer(_config(tmp_path, tok_path, special_tokens=["<|mask|>"]))
    again = tmp_path / "again"
    again.mkdir()
    assert tokenizer_sha256(given.write(again)) == tokenizer_sha256(tok_path)
    assert given.roles == roles and given.added == ()
    # an own tokenizer is never extended: a missing special token is an error, as before
    with pytest.raises(ValueError, match=r"special_tokens \['<\|sep\|>'\] are not special tokens"):
        load_given_tokenizer(_config(tmp_path, tok_path, special_tokens=["<|sep|>"]))


def test_prepare_config_role_fields(tmp_path, gpt2_file):
    # a trained tokenizer's roles must be among its special tokens
    with pytest.raises(ValueError, match=r"data.prepare.bos_token='<s>'.*data.prepare.special_tokens"):
        _config(tmp_path, None, bos_token="<s>")
    cfg = _config(tmp_path, None, bos_token="<|bos|>", special_tokens=["<|bos|>"], add_bos_token=True)
    tok = train_tokenizer(iter(TEXTS), 300, cfg.special_tokens)
    roles = resolve_roles(tok, None, **cfg.role_settings())
    assert (roles.bos_token, roles.bos_id, roles.prepend_id, roles.eos_id) == ("<|bos|>", 2, 2, 0)
    with pytest.raises(ValueError, match=r"add_bos_token=True needs data.prepare.bos_token"):
        _config(tmp_path, None, add_bos_token=True)
    with pytest.raises(ValueError, match="always added"):
        _config(tmp_path, None, special_tokens=["<|pad|>"])
    # a given tokenizer may get <|pad|> added as its pad token
    assert _config(tmp_path, gpt2_file, special_tokens=["<|pad|>"]).special_tokens == ["<|pad|>"]
    with pytest.raises(ValueError, match="eos_token"):
        _config(tmp_path, gpt2_file, eos_token="")


# ---- manifests -------------------------------------------------------------------------------------


def _old_manifest() -> dict:
    """A manifest.json as written before the role fields existed."""
    row_len = 4
    shard = {"path": "train/part-00000.parquet", "rows": 2, "tokens": 2 * row_len, "row_id_start": 0}
    return {
        "format": "rpt-packed-v1",
        "seq_len": 3,
        "row_len": row_len,
        "seed": 0,
        "created": "2024-01-01T00:00:00+00:00",
        "source": {"corpus": "builtin:pydoc", "documents": 3, "characters": 10},
        "tokenizer": {
            "path": "tokenizer.json",
            "sha256": "0" * 64,
            "vocab_size": 300,
            "eos_id": 0,
            "pad_id": 1,
            "special_tokens": {EOS_TOKEN: 0, PAD_TOKEN: 1, "<|mask|>": 2},
        },
        "splits": {"train": {"rows": 2, "tokens": 8, "shards": [shard]}, "val": {"rows": 0, "tokens": 0}},
        "documents": {"train": 2, "val": 1},
        "dropped_tokens": 0,
    }


def test_an_old_manifest_without_the_role_fields_loads(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(_old_manifest()))
    info = Manifest.load(tmp_path).tokenizer
    assert (info.eos_token, info.pad_token, info.bos_token, info.bos_id, info.add_bos) == (
        EOS_TOKEN, PAD_TOKEN, None, None, False
    )  # fmt: skip
    assert info.roles() == TokenizerRoles.project_default()
    assert info.roles().to_tokenizer_config()["eos_token"] == EOS_TOKEN


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"eos_token": "</s>"}, r"special_tokens\['</s>'\] must equal eos_id=0"),
        ({"pad_token": None}, "pad_id=1 must equal eos_id=0"),
        ({"bos_token": "<|mask|>"}, "must be set together"),
        ({"bos_token": "<|mask|>", "bos_id": 5}, r"special_tokens\['<\|mask\|>'\] must equal bos_id=5"),
        ({"add_bos": True}, "add_bos is true"),
    ],
)
def test_tokenizer_info_checks_the_role_tokens(over, match):
    raw = {**_old_manifest()["tokenizer"], **over}
    with pytest.raises(ValueError, match=match):
        TokenizerInfo.model_validate(raw)


def test_a_stock_manifest_round_trips():
    raw = {
        **_old_manifest()["tokenizer"],
        "special_tokens": {"<unk>": 0, "<s>": 1, "</s>": 2},
        "eos_id": 2, "pad_id": 2, "eos_token": "</s>", "pad_token": None, "bos_token": "<s>", "bos_id": 1,
        "add_bos": True,
    }  # fmt: skip
    info = TokenizerInfo.model_validate(raw)
    assert info.roles().prepend_id == 1 and info.roles().pads_with_eos


def test_transformers_loads_the_prepared_folder(tmp_path, llama_dir):
    transformers = pytest.importorskip("transformers")
    choice = load_given_tokenizer(_config(tmp_path, llama_dir))
    out = tmp_path / "prepared"
    out.mkdir()
    choice.write(out)
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == ("<s>", "</s>", None)
    assert (hf.bos_token_id, hf.eos_token_id) == (1, 2)
    assert hf("rows of tokens")["input_ids"][0] == 1  # the copied post-processor prepends <s>
