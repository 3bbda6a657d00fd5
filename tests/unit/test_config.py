"""Config parsing: every shipped file parses; overrides; bad input names field, value and what is allowed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import ConfigError, apply_overrides, load_config, parse_override, validate_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"tiny-lm.yaml", "debug-lm.yaml"}


def config_kind(path: Path) -> str:
    import yaml

    raw = yaml.safe_load(path.read_text())
    return "tune" if "continual" in raw else "continual" if "tasks" in raw else "run"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses(path):
    kind = config_kind(path)
    if kind == "run":
        cfg = load_config(path)
        assert cfg.name and cfg.trainer.max_steps >= 1
        assert cfg.data.prepare_config() is None or cfg.data.prepare_config().out_dir == Path(cfg.data.path)
    elif kind == "continual":
        from cluster.continual import load_continual

        cfg = load_continual(path)
        assert len(cfg.tasks) >= 1 and all(cfg.task_config(i, previous_checkpoint="x") for i in range(len(cfg.tasks)))
    else:
        from cluster.tune import load_tune

        cfg = load_tune(path)
        assert len(cfg.trials()) >= 1


def test_dotted_overrides_documented_in_readme():
    cfg = load_config(REPO / "configs/tiny-lm.yaml", ["model.preset=debug", "trainer.max_steps=50"])
    assert cfg.model.preset == "debug" and cfg.trainer.max_steps == 50
    # schedule total_steps follows trainer.max_steps unless set
    assert cfg.schedule_params()["total_steps"] == 50


def test_override_parsing():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=1e-3") == (["a"], 1e-3)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=text") == (["a"], "text")
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2", "d.e=x"]) == {"a": {"b": 1, "c": 2}, "d": {"e": "x"}}
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_override("trainer.max_steps")
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])


def _raw():
    import yaml

    return yaml.safe_load((REPO / "configs/debug-lm.yaml").read_text())


def test_unknown_key_names_field_and_allowed_fields():
    raw = _raw()
    raw["trainer"]["max_stpes"] = 5
    with pytest.raises(ConfigError) as e:
        validate_config(raw, "x.yaml")
    msg = str(e.value)
    assert "x.yaml" in msg and "trainer.max_stpes" in msg and "max_steps" in msg


def test_wrong_type_names_field_and_value():
    raw = _raw()
    raw["trainer"]["max_steps"] = "many"
    with pytest.raises(ConfigError) as e:
        validate_config(raw)
    assert "trainer.max_steps" in str(e.value) and "'many'" in str(e.value)


def test_out_of_range_and_enum_values():
    for section, key, value, expect in [
        ("trainer", "zero_stage", 4, "less than or equal to 3"),
        ("trainer", "precision", "fp8", "fp32"),
        ("optimizer", "lr_peak", -1.0, "greater than 0"),
        ("tracking", "alias", "latest", "reserved"),
    ]:
        raw = _raw()
        raw[section][key] = value
        with pytest.raises(ConfigError) as e:
            validate_config(raw)
        assert f"{section}.{key}" in str(e.value) and expect in str(e.value), str(e.value)


def test_bad_family_names_and_params():
    raw = _raw()
    raw["schedule"] = {"name": "cosine_wrong"}
    with pytest.raises(ConfigError, match="available"):
        validate_config(raw)
    raw = _raw()
    raw["objective"] = {"name": "causal_lm", "zloss": 1e-4}
    with pytest.raises(ConfigError, match="zloss"):
        validate_config(raw)
    raw = _raw()
    raw["data"]["prepare"]["vocab_sise"] = 3
    with pytest.raises(ConfigError, match="vocab_sise"):
        validate_config(raw)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_cli_exits_nonzero_with_message():
    r = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "config", "show", str(REPO / "configs/debug-lm.yaml"), "trainer.bogus=1"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert r.returncode == 2
    assert "trainer.bogus" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "config", "show", str(REPO / "configs/debug-lm.yaml"), "trainer.max_steps=7"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert r.returncode == 0 and "max_steps: 7" in r.stdout


def test_optimizer_betas_outside_the_unit_interval_fail_on_the_driver():
    import pytest

    from cluster.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"optimizer.betas=\[0.9, 1.5\] is not allowed; allowed: two numbers in \[0, 1\)"):
        load_config(REPO / "configs/debug-lm.yaml", ["optimizer.betas=[0.9, 1.5]"])


def test_unreachable_or_mistyped_tracking_uris_fail_in_seconds(tmp_path):
    import socket
    import time

    import pytest

    from cluster.config import ConfigError
    from cluster.tracking import check_reachable

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=rf"127.0.0.1:{port}' does not answer .*tracking.tracking_uri"):
        check_reachable(f"http://127.0.0.1:{port}")
    assert time.monotonic() - t0 < 6
    with pytest.raises(ConfigError, match=r"folder .*no-such-dir' does not exist"):
        check_reachable(f"sqlite:///{tmp_path / 'no-such-dir' / 'mlruns.db'}")
    assert not (tmp_path / "no-such-dir").exists()
    check_reachable(f"sqlite:///{tmp_path / 'mlruns.db'}")  # a new store in an existing folder is fine


def test_data_sources_config_errors_name_the_fix():
    """data.sources replaces data.path: both, neither, duplicate or reserved names, replay or prepare beside a
    mixture, a non-positive weight are refused on the driver, naming the field."""
    web, code = {"name": "web", "path": "/d/web", "weight": 3}, {"name": "code", "path": "/d/code", "weight": 1}
    cases = [
        ({"path": "/d/web", "sources": [web]}, "not both"),
        ({"prepare": None}, "not both and not neither"),
        ({"sources": [web, {**code, "name": "web"}]}, "unique"),
        ({"sources": [web, {**code, "name": "val"}]}, "['val']"),
        ({"sources": [web, code], "replay": {"fraction": 0.1, "paths": ["/d/old"]}}, "add the replayed folders"),
        ({"sources": [web, code], "prepare": {"corpus": "builtin:pydoc"}}, "prepare each source"),
        ({"sources": [web, code], "eval_sets": {"code": "/d/code"}}, "share a name"),
        ({"sources": [web, {**code, "weight": 0}]}, "data.sources.1.weight"),
        ({"sources": [web, {**code, "name": "a b"}]}, "data.sources.1.name"),
    ]
    for data, expect in cases:
        raw = _raw()
        raw["data"].pop("path")
        raw["data"].pop("prepare")
        raw["data"].update(data)
        with pytest.raises(ConfigError) as e:
            validate_config(raw)
        assert expect in str(e.value), (data, str(e.value))
    raw = _raw()
    raw["data"] = {"sources": [web, code]}
    cfg = validate_config(raw)
    assert cfg.data.root == "/d/web" and cfg.data.root_field == "data.sources[0].path" and cfg.data.path is None
