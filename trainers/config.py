"""Typed configuration of one training run: the contract between the YAML file, the driver and the workers.

The driver parses and validates it (``cluster.config.load_config``); the worker's first line turns the
plain dict Ray hands it back into :class:`RunConfig` (``RunConfig.model_validate``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from models import ModelConfig
from models.vit import ViTConfig


class ConfigError(ValueError):
    """A user error in a config file, an override or the data it names; the message says how to fix it.

    Raised on the driver before Ray starts (``cluster.config.load_config``, ``cluster.data_check``)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ReplaySpec(_Strict):
    """Replay of earlier tasks' data mixed into every micro-batch (continual pre-training).

    Ibrahim et al. (arXiv 2403.08763): a few percent of replay (5%, up to 25% under strong
    distribution shift) limits forgetting.
    """

    fraction: float = Field(0.0, ge=0.0, lt=1.0, description="share of the rows drawn from replay (the task's folder "
                            "and the replayed ones are a two-source mixture, data.mixture: within one row of the share "
                            "at every micro-batch)")
    paths: list[str] = Field(default_factory=list, description="prepared folders of the earlier tasks replayed")
    seed: int = Field(1, description="seed of the replay stream's order")


class SourceSpec(_Strict):
    """One source of a weighted data mixture (:mod:`data.mixture`): a prepared folder and its share of the rows."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                      description="the source's name in metrics (data/<name>/rows_seen, val/<name>/loss) and positions")
    path: str = Field(description="folder written by `rpt data prepare`")
    weight: float = Field(gt=0.0, description="share of the rows (any scale: the weights are normalised)")
    seed: int | None = Field(None, description="seed of the source's shard order (default: the run's seed)")


RESERVED_SOURCE_NAMES = ("val", "probe")  # evaluation-set keys of the loop


class DataSpec(_Strict):
    """Where the prepared (tokenised, packed) shards are, and how to build them if they are missing.

    One folder (``path``) or a weighted mixture of several (``sources``), never both."""

    path: str | None = Field(None, description="folder written by `rpt data prepare` (holds manifest.json)")
    sources: list[SourceSpec] = Field(
        default_factory=list,
        description="weighted mixture of prepared folders [{name, path, weight}] (same tokenizer and seq_len); "
        "replaces path",
    )
    prepare: dict[str, Any] | None = Field(
        None, description="settings for `rpt data prepare` (corpus, seq_len, vocab_size, ...); out_dir is `path`"
    )
    eval_rows: int = Field(256, ge=1, description="validation rows evaluated at every eval (split over ranks)")
    verify_shards: bool | Literal["full"] = Field(
        True, description="check every shard's Parquet footer on the driver before Ray starts; full: read every row too"
    )
    replay: ReplaySpec | None = None
    eval_sets: dict[str, str] = Field(
        default_factory=dict,
        description="extra validation sets {name: prepared folder}, logged as val/<name>/loss at every eval",
    )
    probe_rows: int = Field(
        1024, ge=1, description="image data: labelled training rows embedded as the k-NN / nearest-class-mean bank"
    )
    probe_k: int = Field(20, ge=1, description="image data: neighbours of the k-NN probe (weighted vote)")

    @model_validator(mode="after")
    def _check_prepare(self) -> DataSpec:
        if (self.path is None) == (not self.sources):
            raise ValueError("set data.path (one prepared folder) or data.sources (a weighted mixture: "
                             "[{name, path, weight}, ...]), not both and not neither")
        names = [s.name for s in self.sources]
        clash = sorted({n for n in names if names.count(n) > 1} | (set(names) & set(RESERVED_SOURCE_NAMES)))
        if clash:
            raise ValueError(f"data.sources names must be unique and not {list(RESERVED_SOURCE_NAMES)}: {clash}")
        if set(names) & set(self.eval_sets):
            raise ValueError(f"data.eval_sets {sorted(set(names) & set(self.eval_sets))} share a name with data.sources "
                             "(each source is evaluated as val/<name>/loss already): rename one")
        if self.sources and self.replay is not None and self.replay.fraction > 0:
            raise ValueError("data.replay is for a single data.path; with data.sources add the replayed folders as "
                             "sources with their weight")
        if self.sources and self.prepare is not None:
            raise ValueError("data.prepare builds data.path; with data.sources prepare each source with its own "
                             "config (`rpt data prepare`) and list the prepared folders")
        self.prepare_config()  # fail on the driver, naming the field
        return self

    @property
    def root(self) -> str:
        """The folder whose manifest describes the run's data (tokenizer, seq_len): ``path``, or the first source's."""
        return self.path if self.path is not None else self.sources[0].path

    @property
    def root_field(self) -> str:
        """The config field of :attr:`root`, for error messages."""
        return "data.path" if self.path is not None else "data.sources[0].path"

    def workload(self):
        """The workload spec whose data ``prepare.kind`` builds (:mod:`trainers.workloads`; no kind: text)."""
        from trainers import workloads

        return workloads.for_prepare_kind((self.prepare or {}).get("kind"))

    def prepare_config(self, **overrides: Any):
        """The config that builds ``path`` (None when ``prepare`` is unset), typed by the workload spec:
        ``kind: images`` gives a :class:`data.image_prepare.ImagePrepareConfig`, no ``kind`` a
        :class:`data.prepare.PrepareConfig`."""
        if self.prepare is None:
            return None
        if "out_dir" in self.prepare:
            raise ValueError("data.prepare.out_dir is not allowed: the output folder is data.path")
        return self.workload().prepare_config({**self.prepare, **overrides}, self.path)


class NamedParams(BaseModel):
    """A family member chosen by name with its parameters as sibling keys (``{name: cosine, warmup_steps: 10}``)."""

    model_config = ConfigDict(extra="allow")
    name: str

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ObjectiveSpec(NamedParams):
    name: str = "causal_lm"


class ScheduleSpec(NamedParams):
    name: str = "cosine"


class OptimizerSpec(_Strict):
    """AdamW (Loshchilov & Hutter, arXiv 1711.05101)."""

    lr_peak: float = Field(3e-4, gt=0.0, le=1.0)
    weight_decay: float = Field(0.1, ge=0.0, le=1.0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0.0)

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"optimizer.betas={list(v)} is not allowed; allowed: two numbers in [0, 1), e.g. [0.9, 0.95]")
        return v


class TrainerSpec(_Strict):
    """The worker-side loop, the engine (DeepSpeed or accelerate) and the Ray Train scaling."""

    num_workers: int = Field(2, ge=1, le=4096)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    worker_resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources each worker needs besides its CPUs/GPU, e.g. "
        "{trainer_node: 1} to place the workers on nodes started with --resources '{\"trainer_node\": N}'")
    max_steps: int = Field(300, ge=1, description="optimizer steps of this run (global, across resumes)")
    micro_batch_size: int = Field(16, ge=1, description="rows per rank per forward pass")
    grad_accum_steps: int = Field(1, ge=1)
    grad_clip: float = Field(1.0, ge=0.0, description="global gradient-norm clip; 0 disables")
    engine: Literal["deepspeed", "accelerate"] = Field(
        "deepspeed", description="deepspeed (ZeRO 0-3) or accelerate (zero_stage 0: DDP, 2: FSDP2 sharding gradients "
        "and optimizer state, 3: FSDP2 full shard)")
    zero_stage: int = Field(2, ge=0, le=3, description="0: replicated; 1: optimizer state sharded (deepspeed only); "
                            "2: + gradients; 3: + parameters")
    activation_checkpointing: bool = Field(False, description="recompute each transformer block's activations in "
                                           "the backward instead of keeping them (less memory, ~1/3 more compute)")
    compile: bool = Field(False, description="torch.compile each transformer block (per-block, in place)")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(50, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(0, ge=0, description="Ray Train restarts of the worker group after a failure")
    peak_tflops: float | None = Field(
        None, gt=0.0, description="per-worker peak for MFU; None: a GPU table, or a measured fp32 matmul on CPU"
    )
    init_from: str | None = Field(None, description="weights only, from an exported model or checkpoint folder")
    resume_from: str | None = Field(
        None,
        description="full state (weights, optimizer, step, data position) from a checkpoint folder, into a new "
        "run: anneal branches; a different schedule here is an explicit choice and is logged as a warning",
    )
    resume_data_position: bool = Field(
        True, description="with resume_from: continue its data position (False: a new task's data from its start)"
    )
    data_loader_prefetch: int = Field(2, ge=0)
    on_nonfinite: Literal["stop", "skip", "ignore"] = Field(
        "stop",
        description="a NaN/inf training loss. stop: end the run (nothing further is checkpointed or registered; "
        "checked on the device, no per-step host sync). skip: every rank's loss is checked before each "
        "micro-batch's backward (one all-reduce and host sync per micro-batch); a step where any is NaN/inf "
        "changes no weight (LR 0) and is counted, and the run stops past max_skipped_steps. ignore: train on",
    )
    max_skipped_steps: int = Field(
        10, ge=0,
        description="on_nonfinite=skip: the run stops (NonFiniteLoss) once more steps than this were skipped; "
        "counted over the run, across restarts and --resume (a new run from resume_from starts at 0)",
    )
    nonfinite_check_every: int | None = Field(
        None, ge=1,
        description="on_nonfinite=stop: steps between host reads of the on-device finite flag; None: at logging "
        "steps (where the loop syncs anyway) and before every checkpoint",
    )

    @model_validator(mode="after")
    def _engine_stage(self) -> TrainerSpec:
        if self.engine == "accelerate" and self.zero_stage == 1:
            raise ValueError(
                "trainer.zero_stage=1 has no counterpart with trainer.engine=accelerate; allowed: 0 (DDP), 2 (FSDP2, "
                "gradients and optimizer state sharded), 3 (FSDP2 full shard), or use trainer.engine=deepspeed"
            )
        if self.engine == "accelerate" and self.precision == "fp16":
            raise ValueError(
                "trainer.precision=fp16 with trainer.engine=accelerate is not supported (its loss scaler would need "
                "sharding under FSDP2 and a place in the DCP checkpoint); allowed: precision bf16 or fp32, or "
                "trainer.engine=deepspeed for fp16"
            )
        return self

    @property
    def rows_per_step(self) -> int:
        """Rows one rank consumes per optimizer step."""
        return self.micro_batch_size * self.grad_accum_steps


class TrackingSpec(_Strict):
    tracking_uri: str = Field("sqlite:///mlruns.db", description="MLflow tracking URI; env MLFLOW_TRACKING_URI wins")
    experiment: str = "ray-pretrain"
    artifact_root: str = Field("mlartifacts", description="artifact location for new experiments (path or URI)")
    registered_model: str | None = Field(None, description="MLflow registry name; None: the run name")
    system_metrics_every_s: float = Field(10.0, ge=0, description="MLflow system metrics (CPU, memory, disk, "
                                          "network, GPU) of rank 0's node every so many seconds; 0: off")
    flush_timeout_s: float = Field(120.0, ge=0, description="at the end of a fit, how long rank 0 waits for metrics "
                                   "that MLflow has not taken yet before keeping them in the run folder for the driver")
    end_wait_s: float = Field(120.0, ge=0, description="at the end of a run, how long the driver waits for an "
                              "unreachable tracking server before it leaves registration to `rpt models register`")
    alias: str = Field(
        "current",
        pattern=r"^[A-Za-z0-9_-]+$",
        description="registry alias set on the new version ('latest' is reserved by MLflow: use models:/NAME/latest)",
    )

    @field_validator("alias")
    @classmethod
    def _not_reserved(cls, v: str) -> str:
        if v.lower() == "latest" or v.lower().startswith("v") and v[1:].isdigit():
            raise ValueError(f"alias {v!r} is reserved by MLflow (latest, v<N>); choose another, e.g. 'current'")
        return v


class RunConfig(_Strict):
    """One YAML file = one run."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="run name (Ray run folder, MLflow run)")
    seed: int = 0
    storage_path: str = Field("results", description="Ray Train storage: checkpoints and run folders")
    data: DataSpec
    model: ModelConfig = Field(default_factory=ModelConfig)
    vit: ViTConfig | None = Field(None, description="image objectives: the ViT encoder (preset + overrides); None: tiny")
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    trainer: TrainerSpec = Field(default_factory=TrainerSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)

    @model_validator(mode="before")
    @classmethod
    def _objective_budget(cls, raw: Any) -> Any:
        """Objectives with a ``total_steps`` parameter (HPM's ramps) span the whole run by default, as
        schedules do: it defaults to ``trainer.max_steps``."""
        if not isinstance(raw, dict) or not isinstance(raw.get("objective"), dict):
            return raw
        import objectives

        obj = raw["objective"]
        try:
            fields = objectives.params_model(obj.get("name", "causal_lm")).model_fields
        except ValueError:
            return raw  # an unknown name: _check_families reports it
        if "total_steps" in fields and obj.get("total_steps") is None:
            max_steps = (raw.get("trainer") or {}).get("max_steps", TrainerSpec.model_fields["max_steps"].default)
            raw = {**raw, "objective": {**obj, "total_steps": max_steps}}
        return raw

    @model_validator(mode="after")
    def _check_families(self) -> RunConfig:
        # Validate the named families here so a bad name/parameter fails on the driver.
        import objectives
        from objectives.vision import VISION_OBJECTIVES, VisionObjective
        from trainers import schedules

        obj = objectives.get(self.objective.name, **self.objective.params)
        obj.check_trainer(self.trainer.engine, self.trainer.zero_stage)
        if self.vit is not None and not isinstance(obj, VisionObjective):
            raise ValueError(
                f"vit is set but objective {self.objective.name!r} trains the decoder LM (configured under model:); "
                f"remove vit or choose an image objective ({', '.join(VISION_OBJECTIVES)})"
            )
        schedules.get(self.schedule.name, **self.schedule_params())
        if self.trainer.init_from and self.trainer.resume_from:
            raise ValueError("set only one of trainer.init_from (weights only) and trainer.resume_from (full state)")
        return self

    def schedule_description(self) -> dict[str, Any]:
        """Schedule name + validated parameters (fractions resolved), as stored in checkpoints."""
        from trainers import schedules

        return schedules.describe(self.schedule.name, **self.schedule_params())

    def schedule_params(self) -> dict[str, Any]:
        """Schedule parameters, with ``total_steps`` defaulting to ``trainer.max_steps`` where the schedule has one."""
        from trainers import schedules

        params = self.schedule.params
        fields = schedules.params_model(self.schedule.name).model_fields
        if "total_steps" in fields and "total_steps" not in params:
            params["total_steps"] = self.trainer.max_steps
        return params
