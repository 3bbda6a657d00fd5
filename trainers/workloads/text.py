"""Token rows for the decoder LM: the driver-side spec (torch-free). The worker side is
:mod:`trainers.workloads.text_worker`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from models.files import LM_CONFIG as MODEL_CONFIG
from models.files import LM_WEIGHTS as WEIGHTS
from models.files import TOKENIZER, TOKENIZER_CONFIG
from trainers.workloads.base import DataError, DataFacts, WorkloadSpec

if TYPE_CHECKING:
    from trainers.config import RunConfig



class TextSpec(WorkloadSpec):
    kind = "text"
    manifest_format = "rpt-packed-v1"
    columns = ("tokens", "row_id")
    unit = "tokens"
    export_marker = MODEL_CONFIG
    export_files = (WEIGHTS, MODEL_CONFIG, TOKENIZER)
    optional_files = (TOKENIZER_CONFIG,)
    objective_hint = "a token objective (causal_lm, mlm, span_corruption, ul2, self_distillation)"
    prepare_kind = None
    shares_tokenizer = True

    def prepare_config(self, params: dict, out_dir: str):
        from data.prepare import PrepareConfig

        return PrepareConfig(**{k: v for k, v in params.items() if k != "kind"}, out_dir=out_dir)

    def prepare(self, prepare_config, *, progress: bool) -> None:
        from data.prepare import prepare

        prepare(prepare_config, progress=progress)

    def owns(self, objective_cls: type) -> bool:
        from objectives.base import TokenObjective

        return issubclass(objective_cls, TokenObjective)

    def check(self, cfg: RunConfig, root: Path | str, manifest) -> DataFacts:
        from data.location import is_uri, resolve

        tok = manifest.tokenizer
        # the workers copy the tokenizer into every export: an absolute path, or a URI they read from the store
        tok_file = resolve(root if is_uri(root) else Path(root).resolve()).join(tok.path)
        vocab = tok.vocab_size
        if cfg.model.vocab_size is not None and cfg.model.vocab_size != vocab:
            raise DataError(
                f"model.vocab_size={cfg.model.vocab_size} does not match the tokenizer vocabulary of {vocab} "
                f"({tok_file}); remove model.vocab_size (it defaults to the tokenizer's) "
                "or prepare the data with data.prepare.vocab_size matching the model"
            )
        if cfg.model.max_seq_len is not None and cfg.model.max_seq_len < manifest.seq_len:
            raise DataError(
                f"model.max_seq_len={cfg.model.max_seq_len} is shorter than the data's seq_len={manifest.seq_len} "
                f"({root}/manifest.json); raise model.max_seq_len or prepare shorter rows"
            )
        roles = tokenizer_roles(manifest)
        fields = {
            "tokenizer_path": tok_file.uri,
            "tokenizer_sha256": tok.sha256,
            "vocab_size": vocab,
            "seq_len": manifest.seq_len,
            "special_tokens": dict(tok.special_tokens),
            "eos_id": tok.eos_id,
            "pad_id": tok.pad_id,
            "tokenizer_config": roles,
        }
        return DataFacts(self.kind, manifest, fields)

    def check_other(self, field_name: str, path: str, facts: DataFacts) -> None:
        from data.manifest import Manifest

        try:
            other = Manifest.load(path)
        except (FileNotFoundError, ValueError) as e:
            raise DataError(f"{field_name}={path!r}: {e}") from None
        m = facts.manifest
        if other.tokenizer.sha256 != m.tokenizer.sha256 or other.seq_len != m.seq_len:
            raise DataError(
                f"{field_name}={path!r} was prepared with another tokenizer or seq_len than the run's data: prepare it "
                f"with data.prepare.tokenizer={facts.fields['tokenizer_path']!r} and seq_len={m.seq_len}"
            )

    def check_init(self, cfg: RunConfig, facts: DataFacts) -> None:
        """The start model's vocabulary must be the data tokenizer's; a larger (padded) embedding is
        accepted only when the model carries that very tokenizer (as imported released models do)."""
        src = cfg.trainer.init_from
        if not src:
            return
        init_cfg = Path(src, MODEL_CONFIG)
        if not init_cfg.is_file():
            raise DataError(f"trainer.init_from={src!r} holds no {MODEL_CONFIG}")
        src_vocab = json.loads(init_cfg.read_text()).get("vocab_size")
        vocab = facts.fields["vocab_size"]
        if src_vocab == vocab or (src_vocab > vocab and _same_tokenizer(Path(src), facts)):
            return
        raise DataError(
            f"trainer.init_from model has vocab_size {src_vocab}, the data's tokenizer has {vocab}: "
            "continue pre-training with data tokenised by the model's own tokenizer "
            f"(data.prepare.tokenizer={str(Path(src, TOKENIZER))!r})"
        )

    def fill_config(self, cfg: RunConfig, facts: DataFacts) -> RunConfig:
        """Starting from a model (``trainer.init_from`` or ``resume_from``), its sizes are the run's: the
        architecture comes from its ``model_config.json``; an explicit ``model.preset`` or size that
        contradicts it is an error naming both. Training knobs (dropout, init_std) stay the config's."""
        src = cfg.trainer.init_from or cfg.trainer.resume_from
        if not src or not Path(src, MODEL_CONFIG).is_file():
            return cfg
        start = json.loads(Path(src, MODEL_CONFIG).read_text())
        if start["max_seq_len"] < facts.fields["seq_len"]:
            raise DataError(
                f"the start model {src!r} covers {start['max_seq_len']} positions, the data's rows are "
                f"{facts.fields['seq_len']} tokens: prepare the data with a seq_len of at most {start['max_seq_len']}"
            )
        return model_from_start(cfg, start, src)

    def rows_unit(self, facts: DataFacts) -> int:
        return int(facts.fields["seq_len"])

    def worker(self, cfg: RunConfig, plan):
        from trainers.workloads.text_worker import TextWorkload

        return TextWorkload(cfg, plan)

    def pyfunc(self):
        from models.pyfunc import DecoderLMPyfunc

        return DecoderLMPyfunc(), ["torch", "safetensors", "tokenizers", "mlflow", "pydantic"]

    def signature(self):
        from models.pyfunc import decoder_signature

        return decoder_signature()

    def load_export(self, directory: Path):
        from tokenizers import Tokenizer

        from models.io import load_pretrained

        model, _ = load_pretrained(directory)
        return model.eval(), Tokenizer.from_file(str(Path(directory, TOKENIZER)))


_KNOBS = ("dropout", "init_std")  # training settings, not architecture


def model_from_start(cfg: RunConfig, start: dict, src: str) -> RunConfig:
    """``cfg`` with ``model:`` holding the start model's architecture (``preset: null``, every size explicit)."""
    from models import presets
    from trainers.config import RunConfig as _RunConfig

    m, given = cfg.model, cfg.model.model_dump(mode="json")
    arch = {k: v for k, v in start.items() if k not in _KNOBS}
    explicit = {k for k in m.model_fields_set if k in arch and given[k] is not None}
    clash = {k: (given[k], arch[k]) for k in explicit if given[k] != arch[k]}
    if "preset" in m.model_fields_set and m.preset is not None:
        sizes = {k: v for k, v in presets.get(m.preset).items() if k not in ("vocab_size", "max_seq_len")}
        clash.update({f"preset {m.preset!r}: {k}": (v, arch[k]) for k, v in sizes.items() if arch.get(k) != v})
    if clash:
        shown = ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in sorted(clash.items()))
        raise DataError(
            f"model: contradicts the start model {src!r} (config vs model: {shown}); its sizes are the run's: "
            "remove model.preset and the model sizes (set model.preset: null), keep only dropout / init_std"
        )
    raw = cfg.model_dump(mode="json")
    raw["model"] = {"preset": None, **arch, **{k: given[k] for k in _KNOBS}}
    return _RunConfig.model_validate(raw)


def tokenizer_roles(manifest) -> dict:
    """The tokenizer's bos/eos/pad tokens as ``tokenizer_config.json`` keys (written next to every export)."""
    return manifest.tokenizer.roles().to_tokenizer_config()


def _same_tokenizer(model_dir: Path, facts: DataFacts) -> bool:
    from data.tokenizer import tokenizer_sha256

    path = model_dir / TOKENIZER
    return path.is_file() and tokenizer_sha256(path) == facts.fields["tokenizer_sha256"]
