"""A workload spec: everything the system knows about one kind of training data, in one place.

One spec per data kind (token rows for the decoder LM, images for a ViT), registered by the manifest
format its prepared folders carry (:mod:`trainers.workloads`). The driver, the registry, storage and the
CLI ask the spec instead of sniffing files or objective names:

| driver side (torch-free) | worker side (:meth:`WorkloadSpec.worker`) |
|---|---|
| stream columns, export and registry files | model, objective, device inputs |
| data checks, config filling from the data | extra evaluation (probes), export |
| the facts passed to the workers (``FitPlan.data``) | throughput unit, FLOPs per unit |

Adding a data kind is one module: a :class:`WorkloadSpec` subclass + its worker-side :class:`Workload`,
registered with :func:`trainers.workloads.register`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from trainers.config import ConfigError

if TYPE_CHECKING:
    import torch

    from trainers.config import RunConfig


class DataError(ConfigError):
    """Prepared data that cannot feed the configured run; the message names the field and the fix."""


@dataclass
class DataFacts:
    """What the driver learnt from the prepared data: its manifest and the fields the workers get."""

    kind: str
    manifest: Any
    fields: dict[str, Any] = field(default_factory=dict)


class Workload(Protocol):
    """The worker-side half of a spec: what :class:`trainers.loop.Trainer` trains and how."""

    unit: str
    units_per_row: int
    flops_per_unit: float

    def build_model(self) -> torch.nn.Module: ...

    def build_objective(self): ...

    def init_weights(self, model: torch.nn.Module, path: str) -> None: ...

    def inputs(self, parts: list[dict[str, torch.Tensor]], device: torch.device) -> dict[str, torch.Tensor]: ...

    def extra_eval(
        self, trainer, name: str, rows: dict[str, torch.Tensor], bank: dict[str, torch.Tensor] | None
    ) -> dict[str, float]:
        """Metrics beyond the loss on evaluation set ``name`` (``bank``: the fit's fixed labelled rows, if any)."""

    def export(self, state: dict[str, torch.Tensor], directory: Path) -> None: ...


class WorkloadSpec:
    """Base class of the data-kind specs; subclasses fill the class attributes and the hooks."""

    kind: str
    manifest_format: str
    columns: tuple[str, ...]  # columns of the shards the training stream reads (row_id included)
    unit: str  # throughput unit: "tokens" or "images"
    export_marker: str  # the file that identifies an export folder of this kind
    export_files: tuple[str, ...]  # consolidated export in every checkpoint, all required
    optional_files: tuple[str, ...] = ()  # export files older checkpoints may lack
    objective_hint: str = ""  # how to choose an objective of this kind, for error messages
    prepare_kind: str | None = None  # the data.prepare.kind that builds this data (None: the default, text)
    shares_tokenizer: bool = False  # later continual tasks reuse the first task's tokenizer (one vocabulary)

    # ---- objectives ------------------------------------------------------------------------------
    def owns(self, objective_cls: type) -> bool:
        """Whether objectives of class ``objective_cls`` (from the objective registry) train on this data kind."""
        raise NotImplementedError

    # ---- data preparation -----------------------------------------------------------------------
    def prepare_config(self, params: dict[str, Any], out_dir: str):
        """The typed config of ``rpt data prepare`` for ``data.prepare`` = ``params`` into ``out_dir``."""
        raise NotImplementedError

    def prepare(self, prepare_config, *, progress: bool) -> None:
        """Build the prepared folder (Ray Data; Ray must be initialised)."""
        raise NotImplementedError

    # ---- driver side ----------------------------------------------------------------------------
    def check(self, cfg: RunConfig, root: Path | str, manifest) -> DataFacts:
        """Everything about the prepared data that can fail, before Ray starts; returns the facts."""
        raise NotImplementedError

    def check_other(self, field_name: str, path: str, facts: DataFacts) -> None:
        """An evaluation or replay folder must match ``data.path`` (tokenizer, image size, ...)."""
        raise NotImplementedError

    def check_init(self, cfg: RunConfig, facts: DataFacts) -> None:
        """``trainer.init_from`` must be an export of this kind that fits the data."""

    def fill_config(self, cfg: RunConfig, facts: DataFacts) -> RunConfig:
        """Sizes the config leaves unset that come from the data; contradictions are errors naming both."""
        return cfg

    def eval_shards(self, cfg: RunConfig, train_shards: list[str]) -> dict[str, list[str]]:
        """Extra fixed evaluation sets besides the validation splits (the image probes' bank)."""
        return {}

    def rows_unit(self, facts: DataFacts) -> int:
        """Units (tokens, images) per row."""
        return 1

    # ---- worker side ----------------------------------------------------------------------------
    def worker(self, cfg: RunConfig, plan) -> Workload:
        raise NotImplementedError

    # ---- registry -------------------------------------------------------------------------------
    def is_export(self, directory: Path) -> bool:
        return (Path(directory) / self.export_marker).is_file()

    def registry_files(self, directory: Path) -> list[str]:
        """The files of an export folder that a registered model version holds."""
        return [*self.export_files, *(f for f in self.optional_files if (Path(directory) / f).is_file())]

    def pyfunc(self):
        """``(python_model, pip_requirements)`` of the registered MLflow pyfunc model."""
        raise NotImplementedError

    def signature(self):
        """The pyfunc's ``mlflow.models.ModelSignature`` (inputs, outputs, inference params), or None."""
        return None

    def load_export(self, directory: Path):
        """``(model, processor)`` of a local export folder (what ``cluster.registry.load_model`` returns)."""
        raise NotImplementedError
