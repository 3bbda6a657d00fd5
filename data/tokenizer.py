"""Tokenizers of `rpt data prepare` (Hugging Face `tokenizers`): the project's own byte-level BPE, or a
released model's tokenizer, and the roles of their special tokens.

The project's own tokenizer is a byte-level BPE (GPT-2 style, arXiv:1508.07909 for BPE): the
pre-tokenizer maps every byte to one of 256 printable symbols, so any text encodes without an unknown
token and decodes back exactly. Special tokens come first: `<|eos|>` is id 0, `<|pad|>` id 1, then any
extra special tokens in order.

A released model's tokenizer (`data.prepare.tokenizer`: a `tokenizer.json` or a Hugging Face tokenizer
folder) brings its own special tokens. :func:`resolve_roles` decides which of them ends a document
(EOS), pads (PAD) and begins a document (BOS), and whether BOS is prepended; see
:class:`TokenizerRoles` for the precedence. The Hugging Face files read are `tokenizer_config.json`
(`bos_token`, `eos_token`, `pad_token`: a string or an AddedToken dict with a `content` key;
`add_bos_token`) and `special_tokens_map.json` (the same token keys), as `transformers` writes them.

Encoding adds no special tokens by itself (`add_special_tokens=False`, so a tokenizer's own
post-processor is not applied); the packer appends EOS after every document and prepends BOS when
`add_bos_token`. Note that `tokenizers` maps a literal "<|eos|>" (or "</s>", ...) in the input text to
the special id unless `tok.encode_special_tokens = True` is set, as the packer does
(`data/prepare.py:TokenizeAndPack`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
BASE_SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
BYTE_ALPHABET_SIZE = 256
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
ROLES = ("bos", "eos", "pad")


def all_special_tokens(extra: Sequence[str] = ()) -> list[str]:
    """`<|eos|>`, `<|pad|>`, then the extra special tokens (duplicates of those two are dropped)."""
    out = list(BASE_SPECIAL_TOKENS)
    for token in extra:
        if token not in out:
            out.append(token)
    return out


def min_vocab_size(extra_special_tokens: Sequence[str] = ()) -> int:
    """The smallest useful vocab: 256 byte symbols plus the special tokens."""
    return BYTE_ALPHABET_SIZE + len(all_special_tokens(extra_special_tokens))


def _batched(texts: Iterable[str | Sequence[str]], batch: int = 256) -> Iterator[list[str]]:
    buf: list[str] = []
    for item in texts:
        if isinstance(item, str):
            buf.append(item)
        else:
            buf.extend(item)
        if len(buf) >= batch:
            yield buf
            buf = []
    if buf:
        yield buf


def train_tokenizer(
    texts_iter: Iterable[str | Sequence[str]],
    vocab_size: int,
    special_tokens: Sequence[str] = (),
    *,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on the driver.

    `texts_iter` yields documents (strings) or batches of them. `vocab_size` counts the special tokens
    and the 256 byte symbols; a small corpus can run out of merges and end up smaller (the caller
    reads the real size from `get_vocab_size()`).
    """
    specials = all_special_tokens(special_tokens)
    if vocab_size < BYTE_ALPHABET_SIZE + len(specials):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
            f"{BYTE_ALPHABET_SIZE} byte symbols + {len(specials)} special tokens = "
            f"{BYTE_ALPHABET_SIZE + len(specials)}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(_batched(texts_iter), trainer=trainer)
    ids = special_token_ids(tok)
    assert ids[EOS_TOKEN] == 0 and ids[PAD_TOKEN] == 1, ids  # BpeTrainer assigns specials first
    return tok


def tokenizer_file(path: str | Path) -> Path:
    """The `tokenizer.json` of `data.prepare.tokenizer`: the path itself, or `PATH/tokenizer.json`."""
    path = Path(path)
    if path.is_dir():
        file = path / TOKENIZER_FILE
        if not file.is_file():
            found = sorted(p.name for p in path.iterdir())[:10]
            raise FileNotFoundError(
                f"data.prepare.tokenizer={str(path)!r} is a folder without {TOKENIZER_FILE} (it holds "
                f"{found}); point it at a Hugging Face tokenizer folder with a tokenizer.json (a slow-only "
                "tokenizer, e.g. tokenizer.model, can be converted with transformers: "
                "AutoTokenizer.from_pretrained(DIR).save_pretrained(NEW_DIR)) or at a tokenizer.json file"
            )
        return file
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer file {str(path)!r} does not exist; set data.prepare.tokenizer to a tokenizer.json "
            "(for example one written by `rpt data prepare`) or a Hugging Face tokenizer folder, or leave it "
            "unset to train one"
        )
    return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a `tokenizer.json` file, or the one in a Hugging Face tokenizer folder.

    Any special tokens are accepted here; which token ends a document (and which pads, and which begins
    one) is decided by :func:`resolve_roles`.
    """
    file = tokenizer_file(path)
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
        raise ValueError(
            f"{str(file)!r} (data.prepare.tokenizer) is not a valid tokenizers JSON file: {exc}; point "
            "data.prepare.tokenizer at a tokenizer.json written by the `tokenizers` library or transformers"
        ) from exc


def tokenizer_sha256(path: str | Path) -> str:
    """Hex SHA-256 of the tokenizer file's bytes (recorded in the manifest and checkpoints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def special_token_ids(tok: Tokenizer) -> dict[str, int]:
    """`{token: id}` of the tokenizer's special tokens, in id order."""
    decoder = tok.get_added_tokens_decoder()  # {id: AddedToken}
    return {decoder[i].content: int(i) for i in sorted(decoder) if decoder[i].special}


def vocab_size_of(tok: Tokenizer) -> int:
    """Rows a model's embedding needs for this tokenizer: one past its largest id, added tokens included."""
    decoder = tok.get_added_tokens_decoder()  # {id: AddedToken}
    return max(tok.get_vocab_size(with_added_tokens=True), max(decoder, default=-1) + 1)


def is_project_tokenizer(tok: Tokenizer) -> bool:
    """Whether `tok` is one of the project's own tokenizers: `<|eos|>` = 0 and `<|pad|>` = 1, both special."""
    ids = special_token_ids(tok)
    return ids.get(EOS_TOKEN) == 0 and ids.get(PAD_TOKEN) == 1


def few_special_tokens(tok: Tokenizer, n: int = 8) -> str:
    """A short listing of the tokenizer's special tokens for error messages."""
    names = list(special_token_ids(tok))
    if not names:
        return "no special tokens"
    shown = ", ".join(repr(t) for t in names[:n])
    return f"special tokens {shown}" + (f", ... ({len(names)} in all)" if len(names) > n else "")


def add_special_tokens(tok: Tokenizer, tokens: Sequence[str]) -> list[str]:
    """Add the `tokens` that are not yet special tokens of `tok` as special tokens; returns them in order.

    A new token gets the next id after the vocabulary (so `vocab_size_of(tok)` grows by one per token); a
    string the vocabulary already holds as a plain token keeps its id and becomes special.
    """
    have = special_token_ids(tok)
    missing = [t for t in dict.fromkeys(tokens) if t not in have]
    if missing:
        tok.add_special_tokens(missing)
    return missing


# ---- special-token roles --------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizerRoles:
    """Which tokens end (EOS), pad (PAD) and begin (BOS) a document, with their ids.

    Resolved by :func:`resolve_roles`, per role: the explicit `data.prepare.{bos,eos,pad}_token` field >
    the tokenizer folder's `tokenizer_config.json` > its `special_tokens_map.json` > the project's own
    `<|eos|>` / `<|pad|>` when the tokenizer has them (there is no own BOS). `add_bos_token`: the explicit
    `data.prepare.add_bos_token` > `tokenizer_config.json`'s `add_bos_token` > whether the tokenizer's
    post-processor template starts with the BOS token (what `encode(..., add_special_tokens=True)`
    would do) > False.

    No PAD token: `pad_token` is None and `pad_id` is the EOS id. Causal packing never needs padding in
    the training data: every stored row is full (the padded tail of a Ray batch is re-packed on the
    driver, the final partial row dropped), so loss masking does not depend on the pad id; objectives
    that pad their own sequences (span corruption, UL2) pad with it and mask those positions out.
    """

    eos_token: str
    eos_id: int
    pad_token: str | None
    pad_id: int
    bos_token: str | None = None
    bos_id: int | None = None
    add_bos_token: bool = False

    def __post_init__(self) -> None:
        if self.pad_token is None and self.pad_id != self.eos_id:
            raise ValueError(f"without a pad token pad_id must be eos_id={self.eos_id}, got {self.pad_id}")
        if (self.bos_token is None) != (self.bos_id is None):
            raise ValueError(f"bos_token={self.bos_token!r} and bos_id={self.bos_id!r} must be set together")
        if self.add_bos_token and self.bos_id is None:
            raise ValueError("add_bos_token=True needs a bos_token")

    @classmethod
    def project_default(cls) -> TokenizerRoles:
        """The project's own tokenizer: EOS `<|eos|>` = 0, PAD `<|pad|>` = 1, no BOS."""
        return cls(eos_token=EOS_TOKEN, eos_id=0, pad_token=PAD_TOKEN, pad_id=1)

    @property
    def pads_with_eos(self) -> bool:
        """True when the tokenizer has no pad token and EOS pads."""
        return self.pad_token is None

    @property
    def prepend_id(self) -> int | None:
        """The id the packer puts before every document (BOS when `add_bos_token`), else None."""
        return self.bos_id if self.add_bos_token else None

    def special_tokens(self) -> dict[str, int]:
        """`{token: id}` of the role tokens (EOS, then PAD and BOS where they are set)."""
        out = {self.eos_token: self.eos_id}
        if self.pad_token is not None:
            out[self.pad_token] = self.pad_id
        if self.bos_token is not None and self.bos_id is not None:
            out[self.bos_token] = self.bos_id
        return out

    def to_tokenizer_config(self) -> dict[str, Any]:
        """The `tokenizer_config.json` written next to a prepared `tokenizer.json` (and copied into exports).

        Keys: `tokenizer_class` ("PreTrainedTokenizerFast", so that `transformers.AutoTokenizer` loads
        the folder), `bos_token`, `eos_token`, `pad_token` (a string, or None when there is none: EOS
        pads), `add_bos_token` (bool) and `add_eos_token` (False: EOS ends a document in the packed
        data, a prompt is not terminated).
        """
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "add_bos_token": bool(self.add_bos_token),
            "add_eos_token": False,
        }


def config_folder(path: str | Path) -> Path:
    """The folder whose Hugging Face files describe `data.prepare.tokenizer` (the folder, or the file's)."""
    path = Path(path)
    return path if path.is_dir() else path.parent


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"{str(path)!r} (next to data.prepare.tokenizer) is not readable JSON ({exc}); fix or remove it, "
            "or set data.prepare.bos_token / eos_token / pad_token / add_bos_token explicitly"
        ) from exc
    if not isinstance(data, dict):
        raise ValueError(
            f"{str(path)!r} holds {type(data).__name__}, expected a JSON object; fix or remove it"
        )
    return data


def _token_content(value: Any, path: Path, key: str) -> str | None:
    """A token of a Hugging Face config: a string, or an AddedToken dict `{"content": ...}`; None if unset."""
    if value is None:
        return None
    if isinstance(value, str):
        return value or None
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"] or None
    raise ValueError(
        f"{str(path)!r}: {key}={value!r} is neither a token string nor a dict with a 'content' string; fix "
        f"the file or set data.prepare.{key} explicitly"
    )


def hf_token_settings(folder: str | Path) -> dict[str, tuple[Any, str]]:
    """`{key: (value, origin)}` for `bos_token`, `eos_token`, `pad_token`, `add_bos_token` found in a
    Hugging Face tokenizer folder; `tokenizer_config.json` wins over `special_tokens_map.json`, unset or
    null values are left out. `origin` describes where the value came from (for messages)."""
    folder = Path(folder)
    out: dict[str, tuple[Any, str]] = {}
    for name in (TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE):
        path = folder / name
        if not path.is_file():
            continue
        data = _read_json(path)
        for role in ROLES:
            key = f"{role}_token"
            token = _token_content(data.get(key), path, key)
            if token is not None and key not in out:
                out[key] = (token, f"{key}={token!r} in {str(path)!r}")
        add_bos = data.get("add_bos_token")
        if name == TOKENIZER_CONFIG_FILE and add_bos is not None:
            if not isinstance(add_bos, bool):
                raise ValueError(
                    f"{str(path)!r}: add_bos_token={add_bos!r} is not true/false; fix the file or set "
                    "data.prepare.add_bos_token explicitly"
                )
            out["add_bos_token"] = (add_bos, f"add_bos_token={add_bos} in {str(path)!r}")
    return out


def template_first_special(tok: Tokenizer) -> str | None:
    """The special token the post-processor's single-sequence template starts with (e.g. `<s>`), if any.

    Reads the `TemplateProcessing` post-processor (alone or inside a `Sequence`) of the tokenizer's JSON.
    """
    try:
        post = json.loads(tok.to_str()).get("post_processor")
    except (ValueError, AttributeError):
        return None
    if not isinstance(post, dict):
        return None
    procs = (post.get("processors") or []) if post.get("type") == "Sequence" else [post]
    for proc in procs:
        if isinstance(proc, dict) and proc.get("type") == "TemplateProcessing":
            single = proc.get("single") or []
            first = single[0] if single and isinstance(single[0], dict) else {}
            special = first.get("SpecialToken")
            return special.get("id") if isinstance(special, dict) else None
    return None


def resolve_roles(
    tok: Tokenizer,
    path: str | Path | None = None,
    *,
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
    add_bos_token: bool | None = None,
) -> TokenizerRoles:
    """EOS, PAD and BOS of `tok` (precedence in :class:`TokenizerRoles`).

    `path` is `data.prepare.tokenizer` (a `tokenizer.json` or a Hugging Face folder): the
    `tokenizer_config.json` / `special_tokens_map.json` in its folder are read; None for a freshly
    trained tokenizer. Raises ValueError when a role names a token the tokenizer lacks, when no EOS
    can be resolved (set `data.prepare.eos_token`) and when `add_bos_token` is on without a BOS token.
    """
    name = repr(str(tokenizer_file(path))) if path is not None else "the trained tokenizer"
    hints = hf_token_settings(config_folder(path)) if path is not None else {}
    own = special_token_ids(tok)
    explicit = {"bos": bos_token, "eos": eos_token, "pad": pad_token}
    fallback = {"eos": EOS_TOKEN, "pad": PAD_TOKEN}
    found: dict[str, tuple[str | None, int | None]] = {}
    for role in ROLES:
        key = f"{role}_token"
        value: str | None = None
        if explicit[role] is not None:
            value, origin = explicit[role], f"data.prepare.{key}={explicit[role]!r}"
        elif key in hints:
            value, origin = hints[key][0], f"{hints[key][1]} (data.prepare.{key} is unset)"
        elif role in fallback and fallback[role] in own:
            value, origin = fallback[role], f"the project's own {fallback[role]}"
        token_id = tok.token_to_id(value) if value is not None else None
        if value is not None and token_id is None:
            raise ValueError(
                f"{origin} names a token that tokenizer {name} does not have (it has "
                f"{few_special_tokens(tok)}); set data.prepare.{key} to one of its tokens"
                + (" or add it with data.prepare.special_tokens" if path is not None else "")
            )
        found[role] = (value, token_id)
    eos, eos_id = found["eos"]
    if eos is None or eos_id is None:
        looked = f"{TOKENIZER_CONFIG_FILE} / {SPECIAL_TOKENS_MAP_FILE} name none" if path is not None else ""
        raise ValueError(
            f"tokenizer {name} has no end-of-document token the packer can use: data.prepare.eos_token is "
            f"unset{', ' + looked if looked else ''}, and it lacks the project's own {EOS_TOKEN}; set "
            f"data.prepare.eos_token to the token that ends a document (it has {few_special_tokens(tok)})"
        )
    pad, pad_id = found["pad"]
    bos, bos_id = found["bos"]
    if add_bos_token is not None:
        add_bos, origin = bool(add_bos_token), f"data.prepare.add_bos_token={add_bos_token}"
    elif "add_bos_token" in hints:
        add_bos, origin = bool(hints["add_bos_token"][0]), hints["add_bos_token"][1]
    else:
        add_bos = bos is not None and template_first_special(tok) == bos
        origin = f"the post-processor of {name}, which starts every sequence with {bos!r}"
    if add_bos and bos is None:
        raise ValueError(
            f"{origin} asks to prepend a BOS token, but tokenizer {name} has none resolved; set "
            f"data.prepare.bos_token to its begin-of-sequence token (it has {few_special_tokens(tok)}) or "
            "data.prepare.add_bos_token: false"
        )
    return TokenizerRoles(
        eos_token=eos,
        eos_id=int(eos_id),
        pad_token=pad,
        pad_id=int(pad_id) if pad_id is not None else int(eos_id),
        bos_token=bos,
        bos_id=int(bos_id) if bos_id is not None else None,
        add_bos_token=add_bos,
    )


def special_tokens_with_roles(tok: Tokenizer, roles: TokenizerRoles) -> dict[str, int]:
    """The tokenizer's special tokens plus the role tokens (a role may name a plain token), in id order."""
    merged = {**special_token_ids(tok), **roles.special_tokens()}
    return dict(sorted(merged.items(), key=lambda kv: kv[1]))


def write_tokenizer_config(roles: TokenizerRoles, directory: str | Path) -> Path:
    """Write `roles.to_tokenizer_config()` as `DIR/tokenizer_config.json`."""
    path = Path(directory) / TOKENIZER_CONFIG_FILE
    path.write_text(json.dumps(roles.to_tokenizer_config(), indent=2) + "\n", encoding="utf-8")
    return path
