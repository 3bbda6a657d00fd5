"""The `rpt` app: commands from cluster/cli.py and cluster/cli_ops.py, assembled without an import cycle."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[2]


def test_cli_ops_does_not_import_cli_and_rpt_has_every_command():
    code = (
        "import sys, cluster.cli_ops; assert 'cluster.cli' not in sys.modules; "
        "from cluster.cli import app; "
        "print(sorted([c.name or c.callback.__name__ for c in app.registered_commands] "
        "+ [g.name for g in app.registered_groups]))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(sorted(
        ["train", "generate", "continual", "tune", "anneal", "submit",
         "config", "data", "models", "schedules", "jobs", "cluster"]
    ))  # fmt: skip


def test_generate_refuses_an_image_encoder(tmp_path):
    from cluster.cli import app
    from models.files import PROCESSOR, VIT_CONFIG
    from models.vit_io import ImageProcessor

    # the files that make a folder an image encoder's export (generate stops before loading weights)
    (tmp_path / PROCESSOR).write_text(ImageProcessor(image_size=8, channels=1, objective="mae").model_dump_json())
    (tmp_path / VIT_CONFIG).write_text("{}")
    result = CliRunner().invoke(app, ["generate", str(tmp_path), "--prompt", "x"])
    assert result.exit_code == 2
    assert "image encoder (objective 'mae')" in " ".join((result.stderr or result.output).split())


def test_schedules_list_prints_the_registry():
    from cluster.cli import app
    from trainers import schedules

    result = CliRunner().invoke(app, ["schedules", "list"])
    assert result.exit_code == 0 and result.output.split() == schedules.available()


def test_progress_line_shows_step_loss_rate_mfu_wait_and_eta():
    from cluster.progress import progress_line

    m = {"train/loss": 6.1234, "perf/tokens_per_s": 4590.4, "perf/mfu": 0.543, "data/wait_frac": 0.002,
         "val/loss": 6.5, "lr": 1e-3}
    assert progress_line(40, 300, m, 250.0) == (
        "step 40/300  loss 6.1234  4,590 tokens/s  MFU 0.54  data wait 0.2%  val/loss 6.5000  ETA 4m10s"
    )
    assert progress_line(5, 10, {"perf/images_per_s": 12.0}, None) == "step 5/10  12 images/s"


def test_models_register_refuses_what_is_not_a_complete_checkpoint_of_a_run(tmp_path):
    from cluster.cli import app

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    result = CliRunner().invoke(app, ["models", "register", str(tmp_path / "nope"), "--name", "m", "--tracking-uri", uri])
    assert result.exit_code == 2 and "is not a folder" in result.output and "Traceback" not in result.output
    ckpt = tmp_path / "run" / "checkpoint_0001"
    ckpt.mkdir(parents=True)
    (ckpt / "train_state.json").write_text("{}")  # no completion markers: cut off
    result = CliRunner().invoke(app, ["models", "register", str(ckpt), "--name", "m", "--tracking-uri", uri])
    assert result.exit_code == 2 and "not a complete checkpoint" in " ".join(result.output.split())
    assert "no completion marker" in " ".join(result.output.split())
