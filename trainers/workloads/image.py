"""Images for a ViT objective: the driver-side spec (torch-free). The worker side is
:mod:`trainers.workloads.image_worker`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from models.files import ENCODER_WEIGHTS, PROCESSOR, VIT_CONFIG
from trainers.workloads.base import DataError, DataFacts, WorkloadSpec

if TYPE_CHECKING:
    from trainers.config import RunConfig



class ImageSpec(WorkloadSpec):
    kind = "images"
    manifest_format = "rpt-images-v1"
    columns = ("images", "labels", "row_id")
    unit = "images"
    export_marker = VIT_CONFIG
    export_files = (ENCODER_WEIGHTS, VIT_CONFIG, PROCESSOR)
    objective_hint = "an image objective"
    prepare_kind = "images"

    def prepare_config(self, params: dict, out_dir: str):
        from data.image_prepare import ImagePrepareConfig

        return ImagePrepareConfig(**params, out_dir=out_dir)

    def prepare(self, prepare_config, *, progress: bool) -> None:
        from data.image_prepare import prepare_images

        prepare_images(prepare_config, progress=progress)

    def owns(self, objective_cls: type) -> bool:
        from objectives.vision import VisionObjective

        return issubclass(objective_cls, VisionObjective)

    def check(self, cfg: RunConfig, root: Path | str, manifest) -> DataFacts:
        fields = {"image_size": manifest.image_size, "channels": manifest.channels, "n_classes": manifest.n_classes,
                  "class_names": list(manifest.class_names)}
        return DataFacts(self.kind, manifest, fields)

    def check_other(self, field_name: str, path: str, facts: DataFacts) -> None:
        from data.manifest import ImageManifest, load_any_manifest

        try:
            other = load_any_manifest(path)
        except (FileNotFoundError, ValueError) as e:
            raise DataError(f"{field_name}={path!r}: {e}") from None
        m = facts.manifest
        if not isinstance(other, ImageManifest) or (other.image_size, other.channels) != (m.image_size, m.channels):
            raise DataError(
                f"{field_name}={path!r} is not image data of {m.channels}x{m.image_size}x{m.image_size} like "
                f"the run's data: prepare it with data.prepare image_size={m.image_size}, channels={m.channels}"
            )

    def check_init(self, cfg: RunConfig, facts: DataFacts) -> None:
        src = cfg.trainer.init_from
        if src and not Path(src, VIT_CONFIG).is_file():
            raise DataError(
                f"trainer.init_from={src!r} holds no {VIT_CONFIG}: give a checkpoint or pulled model of an image run"
            )

    def fill_config(self, cfg: RunConfig, facts: DataFacts) -> RunConfig:
        """``vit.image_size`` and ``vit.in_channels`` default to the data's (as the LM's vocabulary comes from
        the tokenizer); an explicit value that contradicts the data is an error naming both."""
        from models.vit import ViTConfig
        from trainers.config import RunConfig as _RunConfig

        f = facts.fields
        vit = (cfg.vit or ViTConfig()).model_dump()
        for key, value in (("image_size", f["image_size"]), ("in_channels", f["channels"])):
            if vit[key] is not None and vit[key] != value:
                raise DataError(
                    f"vit.{key}={vit[key]} but {cfg.data.root_field}={cfg.data.root!r} holds {f['channels']}x{f['image_size']}x"
                    f"{f['image_size']} images: remove vit.{key} (it defaults to the data's) or prepare matching data"
                )
            vit[key] = value
        try:
            vit_cfg = ViTConfig.model_validate(vit)
        except ValueError as e:
            raise DataError(f"vit: {e}") from None
        new = cfg.model_dump(mode="json")
        new["vit"] = vit_cfg.model_dump(mode="json")
        return _RunConfig.model_validate(new)

    def eval_shards(self, cfg: RunConfig, train_shards: list[str]) -> dict[str, list[str]]:
        return {"probe": train_shards}  # the labelled bank of the k-NN / nearest-class-mean probes

    def worker(self, cfg: RunConfig, plan):
        from trainers.workloads.image_worker import ImageWorkload

        return ImageWorkload(cfg, plan)

    def pyfunc(self):
        from models.pyfunc import ImageEncoderPyfunc

        return ImageEncoderPyfunc(), ["torch", "safetensors", "mlflow", "pydantic"]

    def load_export(self, directory: Path):
        from models.vit_io import load_embedder

        embedder = load_embedder(directory)
        return embedder, embedder.processor
