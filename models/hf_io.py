"""Hugging Face model folders <-> the project's native decoder export folder. Imports no ``transformers``.

Native decoder export folder (what training exports, the registry holds and :func:`import_hf_folder`
writes):

- ``model.safetensors`` + ``model_config.json`` (:mod:`models.io`);
- ``tokenizer.json`` (a Hugging Face ``tokenizers`` file);
- optionally ``tokenizer_config.json`` with at least ``bos_token``, ``eos_token``, ``pad_token`` (a
  string or null) and ``add_bos_token`` (bool): the token roles (:class:`TokenRoles`). Without it (older
  exports) the roles are eos ``<|eos|>``, pad ``<|pad|>``, no bos, ``add_bos_token`` false.

A Hugging Face folder (what ``save_pretrained`` writes and :func:`export_hf_folder` writes):
``config.json``, ``model.safetensors`` or ``model.safetensors.index.json`` + shards,
``generation_config.json``, ``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json``.

Both directions validate everything (config, every weight name and shape, tokenizer, token roles)
before writing, and write into a temporary sibling folder that is renamed to ``dest`` at the end, so a
refused or failed conversion leaves nothing at ``dest``. ``dest`` must not exist or be empty.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.config import ResolvedModelConfig
from models.hf import (
    SUPPORTED_DTYPES,
    HFFormatError,
    from_hf_config,
    from_hf_state,
    to_hf_config,
    to_hf_state,
)

TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_NAME = "special_tokens_map.json"
HF_CONFIG_NAME = "config.json"
HF_GENERATION_CONFIG_NAME = "generation_config.json"
HF_WEIGHTS_NAME = "model.safetensors"
HF_INDEX_NAME = "model.safetensors.index.json"
_ROLES = ("bos_token", "eos_token", "pad_token")


@dataclass(frozen=True)
class TokenRoles:
    """Which tokens of a tokenizer are BOS / EOS / padding (None: none), and whether prompts start with BOS.

    ``tokenizer_config.json`` of a native export folder stores these four keys (:meth:`to_json`).
    """

    eos_token: str | None = "<|eos|>"
    bos_token: str | None = None
    pad_token: str | None = "<|pad|>"
    add_bos_token: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                "add_bos_token": self.add_bos_token}

    def ids(self, tokenizer: Any, *, source: str = TOKENIZER_CONFIG_NAME) -> dict[str, int | None]:
        """``{"bos_id", "eos_id", "pad_id"}`` in ``tokenizer`` (a ``tokenizers.Tokenizer``); a named token
        the vocabulary lacks is an :class:`HFFormatError`."""
        out = {}
        for role in _ROLES:
            token = getattr(self, role)
            token_id = None if token is None else tokenizer.token_to_id(token)
            if token is not None and token_id is None:
                raise HFFormatError(
                    f"{source}: {role}={token!r} is not in the tokenizer's vocabulary; allowed: a token of "
                    f"tokenizer.json (e.g. one of its special tokens) or null"
                )
            out[role.replace("_token", "_id")] = token_id
        return out


def _read_json(path: Path, *, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HFFormatError(f"{path}: file not found; {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HFFormatError(f"{path}: not valid JSON ({exc}); {what}") from None
    if not isinstance(data, dict):
        raise HFFormatError(f"{path}: holds a {type(data).__name__}; allowed: a JSON object ({what})")
    return data


def read_token_roles(folder: str | os.PathLike) -> TokenRoles:
    """The token roles of a native export folder: its ``tokenizer_config.json``, or the defaults of older
    exports (eos ``<|eos|>``, pad ``<|pad|>``, no bos, ``add_bos_token`` false) when it has none."""
    path = Path(folder) / TOKENIZER_CONFIG_NAME
    if not path.is_file():
        return TokenRoles()
    data = _read_json(path, what="the token roles of a native export folder")
    values: dict[str, Any] = {}
    for role in _ROLES:
        if role not in data:
            raise HFFormatError(f"{path}: {role} is missing; allowed: a token string or null")
        values[role] = _token_content(data[role], path, role)
    add_bos = data.get("add_bos_token")
    if not isinstance(add_bos, bool):
        raise HFFormatError(f"{path}: add_bos_token={add_bos!r} is not supported; allowed: true or false")
    if add_bos and values["bos_token"] is None:
        raise HFFormatError(f"{path}: add_bos_token=true with bos_token=null; allowed: a bos_token, or false")
    return TokenRoles(add_bos_token=add_bos, **values)


def _token_content(value: Any, path: Path, field: str) -> str | None:
    """A special token as ``tokenizer_config.json`` writes it: a string, null, or {"content": ...}."""
    if isinstance(value, Mapping):
        value = value.get("content")
    if value is None or isinstance(value, str):
        return value
    raise HFFormatError(
        f"{path}: {field}={value!r} is not supported; allowed: a string, null or {{'content': str}}"
    )


def _load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    if not path.is_file():
        raise HFFormatError(
            f"{path}: file not found; a fast tokenizer file is required (save the tokenizer with "
            f"PreTrainedTokenizerFast.save_pretrained, or convert a slow one, so that tokenizer.json exists)"
        )
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise HFFormatError(
            f"{path}: not a valid tokenizers file ({exc}); allowed: a tokenizer.json"
        ) from None


def _template_bos(tok_json: Mapping[str, Any]) -> str | None:
    """The special token a TemplateProcessing post-processor puts before a single sequence, if any."""
    pp = tok_json.get("post_processor") or {}
    parts = pp.get("processors", []) if pp.get("type") == "Sequence" else [pp]
    for part in parts:
        if part.get("type") == "TemplateProcessing":
            single = part.get("single") or []
            if single and "SpecialToken" in single[0]:
                return single[0]["SpecialToken"].get("id")
    return None


def _hf_roles(src: Path, tokenizer: Any, tok_json: Mapping[str, Any]) -> TokenRoles:
    """Token roles of a Hugging Face folder: ``tokenizer_config.json``, then ``special_tokens_map.json``;
    EOS also from ``generation_config.json`` / ``config.json`` ``eos_token_id``. ``add_bos_token`` is the
    config's, else whether the tokenizer's post-processor prepends the BOS token."""
    configs = []
    for name in (TOKENIZER_CONFIG_NAME, SPECIAL_TOKENS_MAP_NAME):
        if (src / name).is_file():
            configs.append((src / name, _read_json(src / name, what="the tokenizer's settings")))
    values: dict[str, str | None] = dict.fromkeys(_ROLES)
    where: dict[str, str] = {}
    for role in _ROLES:
        for path, data in configs:
            token = _token_content(data.get(role), path, role)
            if token is not None:
                values[role], where[role] = token, path.name
                break
    if values["eos_token"] is None:
        for name in (HF_GENERATION_CONFIG_NAME, HF_CONFIG_NAME):
            if not (src / name).is_file():
                continue
            eos_id = _read_json(src / name, what="the model's settings").get("eos_token_id")
            if isinstance(eos_id, list):
                eos_id = eos_id[0] if eos_id else None
            if eos_id is None:
                continue
            token = tokenizer.id_to_token(eos_id) if isinstance(eos_id, int) else None
            if token is None:
                raise HFFormatError(
                    f"{src / name}: eos_token_id={eos_id!r} is not an id of tokenizer.json; "
                    f"allowed: an id below {tokenizer.get_vocab_size(with_added_tokens=True)}"
                )
            values["eos_token"], where["eos_token"] = token, name
            break
    if values["eos_token"] is None:
        raise HFFormatError(
            f"{src}: no EOS token: tokenizer_config.json / special_tokens_map.json eos_token and "
            f"generation_config.json / config.json eos_token_id are all absent; fix: add \"eos_token\": "
            f"\"<the end-of-text token>\" to {src / TOKENIZER_CONFIG_NAME}"
        )
    template_bos = _template_bos(tok_json)
    add_bos = None
    if configs and configs[0][0].name == TOKENIZER_CONFIG_NAME:
        add_bos = configs[0][1].get("add_bos_token")
    if add_bos is not None and not isinstance(add_bos, bool):
        raise HFFormatError(
            f"{src / TOKENIZER_CONFIG_NAME}: add_bos_token={add_bos!r}; allowed: true or false"
        )
    if values["bos_token"] is None and template_bos is not None and add_bos is not False:
        values["bos_token"], where["bos_token"] = template_bos, TOKENIZER_NAME
    if add_bos is None:
        add_bos = template_bos is not None and template_bos == values["bos_token"]
    if add_bos and values["bos_token"] is None:
        raise HFFormatError(
            f"{src / TOKENIZER_CONFIG_NAME}: add_bos_token=true but bos_token is not set; "
            f"allowed: set bos_token, or add_bos_token false"
        )
    roles = TokenRoles(add_bos_token=add_bos, **values)
    for role in _ROLES:
        token = getattr(roles, role)
        if token is not None and tokenizer.token_to_id(token) is None:
            raise HFFormatError(
                f"{src / where[role]}: {role}={token!r} is not in tokenizer.json's vocabulary; "
                f"allowed: one of its tokens (e.g. an added special token) or null"
            )
    return roles


def _check_vocab(tokenizer: Any, cfg: ResolvedModelConfig, path: Path, field: str) -> None:
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > cfg.vocab_size:
        raise HFFormatError(
            f"{path}: the tokenizer has {size} tokens but {field}={cfg.vocab_size} embedding rows; "
            f"allowed: a tokenizer of at most {cfg.vocab_size} tokens (use the model's own tokenizer, or "
            f"resize the embedding to >= {size} rows)"
        )


def _load_hf_weights(src: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    if (src / HF_WEIGHTS_NAME).is_file():
        return load_file(str(src / HF_WEIGHTS_NAME))
    if not (src / HF_INDEX_NAME).is_file():
        other = sorted(p.name for p in src.glob("*.bin")) + sorted(p.name for p in src.glob("*.pt"))
        hint = f" (found {other[:3]}: convert them to safetensors first)" if other else ""
        raise HFFormatError(
            f"{src}: weight file {HF_WEIGHTS_NAME} (or {HF_INDEX_NAME} with its shards) not found{hint}; "
            f"allowed: safetensors weights as save_pretrained(safe_serialization=True) writes them"
        )
    index_path = src / HF_INDEX_NAME
    weight_map = _read_json(index_path, what="the shard index").get("weight_map")
    if not isinstance(weight_map, Mapping) or not weight_map:
        raise HFFormatError(
            f"{index_path}: weight_map={weight_map!r}; allowed: an object of weight name -> shard file"
        )
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not isinstance(s, str) or not (src / s).is_file()]
    if missing:
        raise HFFormatError(f"{index_path}: shard file(s) {missing[:5]} not found in {src}; copy every shard")
    state: dict[str, Any] = {}
    for shard in shards:
        tensors = load_file(str(src / shard))
        for name in [n for n, s in weight_map.items() if s == shard]:
            if name not in tensors:
                raise HFFormatError(f"{index_path}: weight_map puts {name!r} in {shard}, which lacks it; "
                                    f"allowed: an index that matches its shards")
            state[name] = tensors[name]
    return state


def read_hf_folder(src: str | os.PathLike) -> tuple[ResolvedModelConfig, dict[str, Any], TokenRoles]:
    """Read and check a Hugging Face Llama-architecture folder: ``(config, our state dict, token roles)``.

    ``vocab_size`` is the embedding's row count, which may exceed the tokenizer's vocabulary (released
    models pad it); a tokenizer larger than the embedding is refused. Raises :class:`HFFormatError` (file,
    field, value, allowed values) for anything that would not convert faithfully.
    """
    src = Path(src)
    if not src.is_dir():
        raise HFFormatError(
            f"{src}: not a directory; allowed: a Hugging Face model folder (config.json, weights)"
        )
    config = _read_json(src / HF_CONFIG_NAME, what="a Hugging Face model folder needs its config")
    cfg = from_hf_config(config, source=str(src / HF_CONFIG_NAME))
    tok_path = src / TOKENIZER_NAME
    tokenizer = _load_tokenizer(tok_path)
    tok_json = json.loads(tok_path.read_text(encoding="utf-8"))
    roles = _hf_roles(src, tokenizer, tok_json)
    _check_vocab(tokenizer, cfg, tok_path, "config.json vocab_size")
    source = str(src / (HF_WEIGHTS_NAME if (src / HF_WEIGHTS_NAME).is_file() else HF_INDEX_NAME))
    state = from_hf_state(_load_hf_weights(src), cfg, source=source)
    return cfg, state, roles


def _check_dest(dest: Path) -> None:
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise HFFormatError(
            f"{dest}: destination exists and is not empty; allowed: a new path or an empty directory "
            f"(conversions never overwrite)"
        )


@contextmanager
def _staging(dest: Path) -> Iterator[Path]:
    """A fresh sibling folder of ``dest``, renamed to ``dest`` when the block succeeds, removed otherwise."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _check_dest(dest)
        os.replace(tmp, dest)  # an empty directory at dest is replaced
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def import_hf_folder(src: str | os.PathLike, dest: str | os.PathLike) -> ResolvedModelConfig:
    """Convert a Hugging Face Llama-architecture folder into a native export folder at ``dest``.

    Writes ``model.safetensors`` + ``model_config.json`` (weights in their stored dtype),
    ``tokenizer.json`` (a copy) and ``tokenizer_config.json`` (the token roles). Everything is checked
    before anything is written; ``dest`` must not exist or be empty. Returns the model's config.
    """
    from models.io import save_pretrained

    dest = Path(dest)
    _check_dest(dest)
    cfg, state, roles = read_hf_folder(src)
    with _staging(dest) as tmp:
        save_pretrained(state, cfg, tmp)
        shutil.copyfile(Path(src) / TOKENIZER_NAME, tmp / TOKENIZER_NAME)
        (tmp / TOKENIZER_CONFIG_NAME).write_text(json.dumps(roles.to_json(), indent=2) + "\n")
    return cfg


def _with_bos_template(tok_json: dict[str, Any], roles: TokenRoles, bos_id: int | None) -> dict[str, Any]:
    """A copy of ``tok_json`` whose post-processor prepends BOS exactly when ``roles.add_bos_token``.

    ``PreTrainedTokenizerFast`` takes special-token insertion from tokenizer.json's post-processor (a
    tokenizer_config.json ``add_bos_token`` is not applied by 4.x and is dropped by 5.x when tokenizer.json
    exists), so the exported copy carries a TemplateProcessing step; other steps (e.g. ByteLevel) stay.
    """
    from tokenizers import Tokenizer, processors

    out = json.loads(json.dumps(tok_json))
    pp = out.get("post_processor")
    steps = (pp.get("processors", []) if pp.get("type") == "Sequence" else [pp]) if pp else []
    steps = [s for s in steps if s.get("type") != "TemplateProcessing"]
    if roles.add_bos_token:
        bos = roles.bos_token
        scratch = Tokenizer.from_str(json.dumps(out))
        scratch.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
        steps.append(json.loads(scratch.to_str())["post_processor"])
    if not steps:
        out["post_processor"] = None
    elif len(steps) == 1:
        out["post_processor"] = steps[0]
    else:
        out["post_processor"] = {"type": "Sequence", "processors": steps}
    Tokenizer.from_str(json.dumps(out))  # the result must load
    return out


def _shards(state: Mapping[str, Any], max_bytes: int) -> list[list[str]]:
    """Names in ``state``'s order, cut greedily into groups of at most ``max_bytes`` (a larger tensor
    alone)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    return groups


def _layer_order(name: str) -> tuple[int, int, str]:
    parts = name.split(".")
    if name.startswith("model.layers."):
        return (1, int(parts[2]), name)
    return (0 if "embed_tokens" in name else 2, 0, name)


def export_hf_folder(
    native_dir: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    max_shard_bytes: int = 5 * 2**30,
    dtype: str = "float32",
) -> Path:
    """Write a native export folder as a Hugging Face ``LlamaForCausalLM`` folder at ``dest``; returns it.

    Writes ``config.json`` (:func:`models.hf.to_hf_config`), the weights cast to ``dtype`` as
    ``model.safetensors``, or, when they exceed ``max_shard_bytes``, as ``model-0000i-of-0000N.safetensors``
    shards + ``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``),
    ``generation_config.json`` (bos/eos/pad ids), and the tokenizer: ``tokenizer.json`` (with a BOS
    post-processor when ``add_bos_token``; the native file is not changed), ``tokenizer_config.json``
    (``PreTrainedTokenizerFast``, the roles, ``model_max_length``) and ``special_tokens_map.json``.
    ``AutoTokenizer.from_pretrained(dest)`` then encodes like the native tokenizer (plus BOS when
    ``add_bos_token``). Everything is checked first; ``dest`` must not exist or be empty.
    """
    import torch
    from safetensors.torch import load_file, save_file

    from models.io import CONFIG_NAME, WEIGHTS_NAME

    native_dir, dest = Path(native_dir), Path(dest)
    if dtype not in SUPPORTED_DTYPES:
        raise HFFormatError(
            f"export_hf_folder: dtype={dtype!r} is not supported; allowed: {list(SUPPORTED_DTYPES)}"
        )
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise HFFormatError(
            f"export_hf_folder: max_shard_bytes={max_shard_bytes!r}; allowed: a positive integer"
        )
    _check_dest(dest)
    cfg_path = native_dir / CONFIG_NAME
    try:
        cfg = ResolvedModelConfig.model_validate_json(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HFFormatError(f"{cfg_path}: file not found; allowed: a native export folder "
                            f"(models.io.save_pretrained writes {CONFIG_NAME})") from None
    except ValueError as exc:
        raise HFFormatError(f"{cfg_path}: not a valid model config ({exc})") from None
    weights_path = native_dir / WEIGHTS_NAME
    if not weights_path.is_file():
        raise HFFormatError(f"{weights_path}: weight file not found; allowed: a native export folder "
                            f"(models.io.save_pretrained writes {WEIGHTS_NAME})")
    tok_path = native_dir / TOKENIZER_NAME
    tokenizer = _load_tokenizer(tok_path)
    _check_vocab(tokenizer, cfg, tok_path, "model_config.json vocab_size")
    roles = read_token_roles(native_dir)
    ids = roles.ids(tokenizer, source=str(native_dir / TOKENIZER_CONFIG_NAME))
    target = getattr(torch, dtype)
    state = to_hf_state(load_file(str(weights_path)), cfg, source=str(weights_path))
    state = {n: state[n].to(target).contiguous() for n in sorted(state, key=_layer_order)}
    tok_json = _with_bos_template(json.loads(tok_path.read_text(encoding="utf-8")), roles, ids["bos_id"])
    hf_config = to_hf_config(cfg, dtype=dtype, **ids)
    generation = {"bos_token_id": ids["bos_id"], "eos_token_id": ids["eos_id"], "pad_token_id": ids["pad_id"]}
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **roles.to_json(),
        "add_eos_token": False,
        "model_max_length": cfg.max_seq_len,
        "clean_up_tokenization_spaces": False,
    }
    special_map = {role: getattr(roles, role) for role in _ROLES if getattr(roles, role) is not None}

    with _staging(dest) as tmp:
        groups = _shards(state, max_shard_bytes)
        if len(groups) == 1:
            save_file(state, str(tmp / HF_WEIGHTS_NAME), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, names in enumerate(groups, start=1):
                shard = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
                save_file({n: state[n] for n in names}, str(tmp / shard), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(names, shard))
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / HF_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        for name, data in ((HF_CONFIG_NAME, hf_config), (HF_GENERATION_CONFIG_NAME, generation),
                           (TOKENIZER_CONFIG_NAME, tok_config), (SPECIAL_TOKENS_MAP_NAME, special_map)):
            (tmp / name).write_text(json.dumps(data, indent=2) + "\n")
        text = json.dumps(tok_json, ensure_ascii=False, indent=2) + "\n"
        (tmp / TOKENIZER_NAME).write_text(text, encoding="utf-8")
    return dest
