"""``rpt``: the command line. Thin: each command parses, then calls one function.

The in-process commands are defined here; ``submit``, ``jobs`` and ``cluster`` (running on a Ray
cluster) are defined in cluster/cli_ops.py and added to :data:`app` by :func:`cluster.cli_ops.register`.
"""

from __future__ import annotations

import logging
import sys

import typer
from rich.console import Console

from cluster import cli_ops

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="ray-pretrain: distributed pre-training on Ray.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect run configs.")
data_app = typer.Typer(no_args_is_help=True, help="Prepare datasets.")
models_app = typer.Typer(no_args_is_help=True, help="Registered models.")
schedules_app = typer.Typer(no_args_is_help=True, help="Learning-rate schedules.")
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")
app.add_typer(schedules_app, name="schedules")
console = Console()
err = Console(stderr=True)

OVERRIDES = typer.Argument(None, help="dotted overrides, e.g. trainer.max_steps=50 model.preset=debug")


def _fail(e: BaseException, code: int = 2) -> None:
    """One paragraph on stderr, no traceback; exit 2 for bad input, 1 for a run that failed."""
    err.print(f"[bold red]error:[/] {e}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _load(path: str, overrides: list[str] | None):
    from cluster.config import ConfigError, load_config

    try:
        return load_config(path, overrides or [])
    except ConfigError as e:
        _fail(e)


@config_app.command("show")
def config_show(config: str, overrides: list[str] | None = OVERRIDES) -> None:
    """Print the resolved config (file + overrides + defaults) as YAML."""
    from cluster.config import dump_config

    console.print(dump_config(_load(config, overrides)), highlight=False, markup=False, end="")


@data_app.command("prepare")
def data_prepare(
    config: str,
    overrides: list[str] | None = OVERRIDES,
    overwrite: bool = typer.Option(False, help="replace an existing prepared folder"),
    if_missing: bool = typer.Option(False, "--if-missing", help="do nothing when data.path already holds a manifest"),
) -> None:
    """Build data.path from data.prepare: tokenised, packed text shards, or image shards (kind: images)."""
    from data.location import check_reachable, resolve
    from data.manifest import is_prepared

    cfg = _load(config, overrides)
    if cfg.data.path is None:
        _fail(ValueError(f"{config}: data.prepare builds data.path, and this config trains on data.sources: prepare "
                         "each source with its own config (rpt data prepare CONFIG data.path=FOLDER ...), one tokenizer "
                         "for all (data.prepare.tokenizer=FIRST/tokenizer.json)"))
    try:
        check_reachable(resolve(cfg.data.path, what="data.path"), "data.path")  # an object store: before Ray starts
        if if_missing and is_prepared(cfg.data.path):  # text or image manifest, on a local path or a store
            console.print(f"{cfg.data.path} is already prepared")
            return
        pcfg = cfg.data.prepare_config(overwrite=overwrite)
        if pcfg is None:
            raise ValueError(
                f"{config}: data.prepare is not set: add data.prepare.corpus (e.g. builtin:pydoc), "
                "or data.prepare.kind: images"
            )
        from cluster.ray_env import init_ray
        from cluster.train import resolve_prepare_models

        pcfg = resolve_prepare_models(cfg, pcfg)
        init_ray(None, dashboard=False)
        cfg.data.workload().prepare(pcfg, progress=True)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        _fail(e)
    except OSError as e:  # an object store that cannot be reached or read
        from data.location import io_error

        _fail(io_error("data.path", cfg.data.path, e))


@app.command()
def train(
    config: str,
    overrides: list[str] | None = OVERRIDES,
    address: str | None = typer.Option(None, help="join a running Ray cluster (ray://... or auto)"),
    resume: bool = typer.Option(False, help="continue the run of this name from its latest checkpoint"),
    tracking_uri: str | None = typer.Option(None, help="MLflow tracking URI (overrides config and env)"),
    register: bool = typer.Option(True, help="register the final model in the MLflow Model Registry"),
    dashboard: bool = typer.Option(False, help="start the Ray dashboard with a local instance"),
) -> None:
    """Train one run: Ray Data shards -> Ray Train + DeepSpeed -> MLflow run and registered model."""
    from cluster.config import ConfigError
    from cluster.tracking import ui_hint
    from cluster.train import TrainingError, run_train

    cfg = _load(config, overrides)
    try:
        out = run_train(cfg, address=address, resume=resume, tracking_uri=tracking_uri, register=register,
                        dashboard=dashboard, console=console)
    except ConfigError as e:
        _fail(e)
    except TrainingError as e:
        _fail(e, code=1)
    m = out.metrics
    console.print(f"[bold green]done[/] run [bold]{out.run_name}[/]  step {m.get('step')}  "
                  f"train/loss {m.get('train/loss', float('nan')):.4f}  val/loss {m.get('val/loss', float('nan')):.4f}"
                  + "".join(f"  {k} {v:.4f}" for k, v in sorted(m.items()) if k.startswith("probe/")))
    console.print(f"MLflow run id: {out.mlflow_run_id}")
    console.print(f"checkpoint:    {out.checkpoint}")
    if out.model_version:
        console.print(f"model:         models:/{out.model_name}/{out.model_version}  (alias @{cfg.tracking.alias})")
    if out.register_later:
        console.print(f"[yellow]not registered[/] (MLflow did not answer); when it does: {out.register_later}",
                      soft_wrap=True)
    console.print(f"MLflow UI:     {ui_hint(out.tracking_uri)}")


FORMAT = typer.Option("native", "--format", help="native (this project's export) or hf (Hugging Face LlamaForCausalLM)")


@models_app.command("pull")
def models_pull(
    uri: str = typer.Argument(..., help="NAME@ALIAS, NAME/VERSION or models:/..."),
    dest: str = typer.Argument(..., help="a new (or empty) folder"),
    fmt: str = FORMAT,
    dtype: str = typer.Option("float32", help="hf: weight dtype (float32, bfloat16, float16)"),
    tracking_uri: str | None = typer.Option(None),
) -> None:
    """Download a registered model into DEST: its export files, or a Hugging Face folder (--format hf)."""
    from cluster.model_io import pull_model
    from cluster.tracking import resolve_tracking_uri

    try:
        out = pull_model(uri, dest, fmt=fmt, dtype=dtype,
                         tracking_uri=resolve_tracking_uri("sqlite:///mlruns.db", tracking_uri))
    except Exception as e:  # MLflow raises its own exception types for unknown names/aliases
        _fail(e)
    console.print(f"pulled {uri} -> {out} ({fmt})")


@models_app.command("register")
def models_register(
    checkpoint: str = typer.Argument(..., help="a checkpoint folder of a run (results/RUN/checkpoint_*, or s3://...)"),
    name: str = typer.Option(..., help="registered model name"),
    alias: list[str] = typer.Option(["current"], help="aliases to set (repeat --alias)"),
    tracking_uri: str | None = typer.Option(None),
) -> None:
    """Register a run's checkpoint later (after the tracking server was away at the end of the run); replays
    the metrics the run could not send and ends its MLflow run FINISHED."""
    from cluster.config import ConfigError
    from cluster.model_io import register_later
    from cluster.tracking import resolve_tracking_uri

    try:
        version, replayed = register_later(checkpoint, name=name, aliases=list(alias),
                                           tracking_uri=resolve_tracking_uri("sqlite:///mlruns.db", tracking_uri))
    except (ConfigError, FileNotFoundError, ValueError) as e:
        _fail(e)
    except Exception as e:  # MLflow's own errors (a name or alias it refuses): one line, not a traceback
        _fail(e, code=1)
    console.print(f"registered models:/{name}/{version} ({', '.join('@' + a for a in alias)}); "
                  f"{replayed} metric records replayed")


@models_app.command("export")
def models_export(
    source: str = typer.Argument(..., help="a checkpoint folder, a run folder (its latest checkpoint) or an export"),
    dest: str = typer.Argument(..., help="a new (or empty) folder"),
    fmt: str = typer.Option("hf", "--format", help="hf (Hugging Face LlamaForCausalLM) or native"),
    dtype: str = typer.Option("float32", help="hf: weight dtype (float32, bfloat16, float16)"),
) -> None:
    """Export a trained decoder from a checkpoint or run folder (no registry needed)."""
    from cluster.model_io import export_model

    try:
        out = export_model(source, dest, fmt=fmt, dtype=dtype)
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    console.print(f"exported {source} -> {out} ({fmt})")


@models_app.command("import")
def models_import(
    src: str = typer.Argument(..., help="a local Hugging Face folder of a Llama-architecture causal LM"),
    name: str = typer.Option(..., help="registered model name"),
    alias: str = typer.Option("base", help="alias set on the new version"),
    tracking_uri: str | None = typer.Option(None),
) -> None:
    """Register a released Llama-family model (config.json + safetensors + tokenizer) as models:/NAME@ALIAS."""
    from cluster.model_io import import_model
    from cluster.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri("sqlite:///mlruns.db", tracking_uri)
    try:
        version = import_model(src, name=name, alias=alias, tracking_uri=uri)
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    console.print(f"imported {src} -> models:/{name}/{version} (alias @{alias})")


@app.command()
def generate(
    uri: str = typer.Argument(..., help="NAME@ALIAS, NAME/VERSION, models:/... or a local export folder"),
    prompt: str = typer.Option(..., help="text to continue"),
    max_new_tokens: int = typer.Option(64),
    temperature: float = typer.Option(0.8, help="0 = greedy"),
    top_k: int | None = typer.Option(50),
    seed: int = typer.Option(0),
    tracking_uri: str | None = typer.Option(None),
) -> None:
    """Sample a continuation of PROMPT from a registered model (KV cache; the tokenizer's own BOS/EOS)."""
    import tempfile
    import types
    from pathlib import Path

    from cluster.registry import pull
    from cluster.tracking import resolve_tracking_uri
    from models.pyfunc import DecoderLMPyfunc
    from trainers import workloads

    with tempfile.TemporaryDirectory(prefix="rpt-generate-") as tmp:
        folder = Path(uri)
        try:
            if not folder.is_dir():
                folder = pull(uri, tmp, tracking_uri=resolve_tracking_uri("sqlite:///mlruns.db", tracking_uri))
        except Exception as e:  # MLflow raises its own exception types for unknown names/aliases
            _fail(e)
        spec = workloads.for_export(folder)
        if spec is not None and spec.kind == "images":
            from models.vit_io import load_processor

            _fail(ValueError(f"{uri} is an image encoder (objective {load_processor(folder).objective!r}): it embeds "
                             "images and has no text to generate; load it with cluster.registry.load_model"))
        lm = DecoderLMPyfunc()
        lm.load_context(types.SimpleNamespace(artifacts={"model_dir": str(folder)}))
        params = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k or 0, "seed": seed}
        text = lm.predict(None, [prompt], params=params)[0]
    console.print(prompt + text, highlight=False, markup=False)


@app.command()
def continual(
    config: str,
    overrides: list[str] | None = OVERRIDES,
    address: str | None = typer.Option(None),
    tracking_uri: str | None = typer.Option(None),
) -> None:
    """Continual pre-training: train the config's tasks in order, fill L[i][j], register each task's model."""
    from cluster.config import ConfigError
    from cluster.continual import load_continual, run_continual
    from cluster.train import TrainingError

    try:
        cfg = load_continual(config, overrides or [])
        res = run_continual(cfg, tracking_uri=tracking_uri, address=address)
    except (ConfigError, FileNotFoundError) as e:
        _fail(e)
    except TrainingError as e:
        _fail(e, code=1)
    names = res["tasks"]
    console.print("L[i][j] = val loss on task j after task i")
    console.print("after \\ on  " + "  ".join(f"{n:>8}" for n in names))
    for n, row in zip(names, res["L"], strict=True):
        console.print(f"{n:>11}  " + "  ".join(f"{v:8.3f}" for v in row))
    console.print(" ".join(f"{k}={v:.4f}" for k, v in res["summary"].items()))
    if "summary_annealed" in res:
        console.print("annealed: " + " ".join(f"{k}={v:.4f}" for k, v in res["summary_annealed"].items()))
    console.print(f"MLflow run: {res['run_id']}")


@app.command()
def tune(
    config: str,
    overrides: list[str] | None = OVERRIDES,
    address: str | None = typer.Option(None),
    tracking_uri: str | None = typer.Option(None),
) -> None:
    """Ray Tune comparison of LR schedules (and seeds, swept keys) over a continual task sequence."""
    from cluster.config import ConfigError
    from cluster.tune import load_tune, run_tune

    try:
        cfg = load_tune(config, overrides or [])
        report = run_tune(cfg, tracking_uri=tracking_uri, address=address)
    except (ConfigError, FileNotFoundError) as e:
        _fail(e)
    except RuntimeError as e:  # a trial failed: its error in one paragraph (its log is in the trial's folder)
        _fail(e, code=1)
    console.print(report["table"], markup=False, highlight=False, soft_wrap=True)
    if len(report["reports_per_trial"]) > len(report["aggregate"]) or report["stopped"]:
        console.print(report["trials_table"], markup=False, highlight=False, soft_wrap=True)
    for s in report["stopped"]:
        last = f" (val/avg_loss {s['val/avg_loss']:.4f})" if s["val/avg_loss"] is not None else ""
        console.print(f"stopped early by the scheduler: {s['trial']} after step {s['step']}{last}",
                      markup=False, highlight=False, soft_wrap=True)
    console.print(f"MLflow parent run: {report['parent_run_id']}   Tune results (TensorBoard): {report['tune_dir']}")


@app.command()
def anneal(
    source: str = typer.Argument(..., help="checkpoint folder, or a registered model NAME@ALIAS / models:/..."),
    steps: int = typer.Option(..., min=1, help="anneal length in optimizer steps"),
    overrides: list[str] | None = OVERRIDES,
    alias: str = typer.Option("annealed", help="registry alias of the annealed version"),
    address: str | None = typer.Option(None),
    tracking_uri: str | None = typer.Option(None),
) -> None:
    """Branch off an infinite-schedule checkpoint: anneal to the minimum LR for STEPS steps into a new run.

    The source checkpoint is only read: the main line can continue at the constant LR."""
    from cluster.anneal import run_anneal
    from cluster.config import ConfigError
    from cluster.tracking import resolve_tracking_uri
    from cluster.train import TrainingError

    uri = resolve_tracking_uri("sqlite:///mlruns.db", tracking_uri)
    try:
        out = run_anneal(source, steps=steps, overrides=overrides or [], alias=alias, tracking_uri=uri, address=address)
    except (ConfigError, FileNotFoundError) as e:
        _fail(e)
    except TrainingError as e:
        _fail(e, code=1)
    console.print(f"[bold green]annealed[/] run [bold]{out.run_name}[/]  val/loss {out.metrics.get('val/loss', float('nan')):.4f}")
    console.print(f"model: models:/{out.model_name}/{out.model_version}  (alias @{alias})")


@schedules_app.command("plot")
def schedules_plot(
    configs: list[str] = typer.Argument(..., help="one or more run configs"),
    out: str = typer.Option("lr.png", help="PNG to write"),
    override: list[str] | None = typer.Option(None, "--set", help="dotted override applied to every config"),
) -> None:
    """Draw the LR of one or more configs over steps, marking phases and task boundaries."""
    from cluster.config import ConfigError
    from cluster.plots import plot_lr_from_configs

    try:
        path = plot_lr_from_configs(configs, out, override or [])
    except (ConfigError, ValueError) as e:
        _fail(e)
    console.print(f"wrote {path}")


@schedules_app.command("list")
def schedules_list() -> None:
    """The registered schedule names."""
    from trainers import schedules

    console.print("\n".join(schedules.available()))


cli_ops.register(app)  # after the commands above: the order of `rpt --help`


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    sys.exit(main())
