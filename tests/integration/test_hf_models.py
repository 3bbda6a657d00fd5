"""Hugging Face models in and out, with real MLflow, real ``transformers`` and real training runs.

- a random ``LlamaForCausalLM`` (GQA, untied, rope_theta 500000; tied; sharded) -> ``rpt models import`` ->
  ``rpt models pull --format hf`` -> ``AutoModelForCausalLM`` gives the original's logits, ``AutoTokenizer``
  encodes like the original;
- a model trained here, pulled or exported with ``--format hf``, loads in ``transformers`` with our logits
  and generates text in a ``text-generation`` pipeline;
- a run started from an imported model: its step-0 ``val/loss`` is the loss ``transformers`` computes on
  the same validation rows;
- bad inputs: a clear error naming the field, nothing registered, no traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from examples.tiny_llama import make_llama  # noqa: E402

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
RPT = [sys.executable, "-m", "cluster.cli"]


def rpt(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([*RPT, *args], capture_output=True, text=True, cwd=REPO, timeout=600)
    if ok:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def ids_for(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", [
    {"name": "untied-gqa"},
    {"name": "tied", "tie": True},
    {"name": "sharded", "max_shard_size": "60KB", "vocab_pad": 64},
])
def test_import_then_pull_hf_reproduces_the_model(variant, tmp_path, tracking_uri):
    kw = {k: v for k, v in variant.items() if k != "name"}
    src = make_llama(tmp_path / "src", **kw)
    if "max_shard_size" in kw:
        assert (src / "model.safetensors.index.json").is_file()
    name = f"llama-{variant['name']}"
    if variant["name"] == "untied-gqa":  # the CLI path once; the others through the same functions
        out = rpt("models", "import", str(src), "--name", name, "--alias", "base", "--tracking-uri", tracking_uri)
        assert f"models:/{name}/1" in out.stdout
        rpt("models", "pull", f"{name}@base", str(tmp_path / "pulled"), "--format", "hf", "--tracking-uri", tracking_uri)
    else:
        from cluster.model_io import import_model, pull_model

        assert import_model(src, name=name, alias="base", tracking_uri=tracking_uri) == 1
        pull_model(f"{name}@base", tmp_path / "pulled", fmt="hf", tracking_uri=tracking_uri)
    cfg = json.loads((src / "config.json").read_text())
    ids = ids_for(cfg["vocab_size"])
    ref, got = hf_logits(src, ids), hf_logits(tmp_path / "pulled", ids)
    assert got.shape == ref.shape and (got - ref).abs().max().item() <= 1e-4
    orig = transformers.AutoTokenizer.from_pretrained(src)
    pulled = transformers.AutoTokenizer.from_pretrained(tmp_path / "pulled")
    text = "def f(x):\n    return x  # the for statement"
    assert pulled(text)["input_ids"] == orig(text)["input_ids"] and pulled.eos_token == "</s>"


def test_trained_model_loads_in_transformers(ray_session, debug_data, tmp_path, tracking_uri):
    from cluster.config import load_config
    from cluster.registry import load_model
    from cluster.train import run_train

    cfg = load_config(REPO / "configs/debug-lm.yaml", [
        f"data.path={debug_data}", f"storage_path={tmp_path / 'results'}", f"tracking.artifact_root={tmp_path / 'a'}",
        "trainer.max_steps=4", "trainer.eval_every=4", "trainer.checkpoint_every=4", "trainer.log_every=2",
        "name=hf-export", "tracking.registered_model=hf-export",
    ])
    out = run_train(cfg, tracking_uri=tracking_uri)
    rpt("models", "pull", "hf-export@current", str(tmp_path / "hf"), "--format", "hf", "--tracking-uri", tracking_uri)
    rpt("models", "export", out.checkpoint, str(tmp_path / "hf2"), "--format", "hf")
    rpt("models", "export", str(Path(out.checkpoint).parent), str(tmp_path / "hf3"), "--format", "hf")  # run folder
    ours, tok = load_model("hf-export@current", tracking_uri=tracking_uri)
    ids = ids_for(1024, seed=1)
    with torch.no_grad():
        ref = ours(ids)
    for folder in ("hf", "hf2", "hf3"):
        got = hf_logits(tmp_path / folder, ids)
        assert (got - ref).abs().max().item() <= 1e-4, folder
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    prompt = "The for statement"
    assert hf_tok(prompt)["input_ids"] == tok.encode(prompt).ids and hf_tok.eos_token == "<|eos|>"
    gen = transformers.pipeline("text-generation", model=str(tmp_path / "hf"), tokenizer=str(tmp_path / "hf"),
                                device="cpu")
    text = gen(prompt, max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith(prompt) and len(text) > len(prompt)
    # a folder that is not empty is never overwritten
    r = rpt("models", "export", out.checkpoint, str(tmp_path / "hf2"), "--format", "hf", ok=False)
    assert r.returncode == 2 and "not empty" in r.stderr and "Traceback" not in r.stderr


def test_run_from_imported_model_starts_at_the_transformers_loss(ray_session, tmp_path, tracking_uri):
    import mlflow

    from cluster.config import load_config
    from cluster.model_io import import_model
    from cluster.train import run_train
    from data.prepare import PrepareConfig, prepare
    from data.stream import load_shards, read_rows

    src = make_llama(tmp_path / "src", vocab_pad=64)
    import_model(src, name="llama-start", alias="base", tracking_uri=tracking_uri)
    data = tmp_path / "data"
    prepare(PrepareConfig(corpus="builtin:pydoc", out_dir=data, seq_len=32, tokenizer=str(src), max_documents=40,
                          shard_rows=128, val_fraction=0.1, seed=0), progress=False)
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["tokenizer"]["eos_token"] == "</s>" and manifest["tokenizer"]["add_bos"] is True
    cfg = load_config(REPO / "configs/debug-lm.yaml", [
        f"data.path={data}", f"storage_path={tmp_path / 'results'}", f"tracking.artifact_root={tmp_path / 'a'}",
        "model.preset=null", "trainer.init_from=models:/llama-start@base", "trainer.max_steps=4",
        "trainer.eval_every=4", "trainer.checkpoint_every=4", "trainer.log_every=2", "data.eval_rows=32",
        "name=from-llama", "tracking.registered_model=from-llama",
    ])
    out = run_train(cfg, tracking_uri=tracking_uri)
    val0 = {m.step: m.value for m in mlflow.MlflowClient(tracking_uri).get_metric_history(out.mlflow_run_id, "val/loss")}[0]
    rows = torch.from_numpy(read_rows([s.path for s in load_shards(data, "val")], ["tokens"], 32)["tokens"]).long()
    train = read_rows([s.path for s in load_shards(data, "train")], ["tokens"], 10**6)["tokens"]
    assert (train == 1).sum() >= 30 and (train == 2).sum() >= 30  # BOS opens each document, EOS ends it
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(rows, labels=rows).loss.item()
    assert val0 == pytest.approx(ref, rel=1e-4)
    # the trained model keeps the padded embedding and loads in transformers
    rpt("models", "pull", "from-llama@current", str(tmp_path / "hf"), "--format", "hf", "--tracking-uri", tracking_uri)
    assert json.loads((tmp_path / "hf/config.json").read_text())["vocab_size"] == 512 + 64
    hf_logits(tmp_path / "hf", ids_for(512))


@pytest.mark.parametrize("case", ["model_type", "attention_bias", "missing_weights", "no_eos", "vocab_too_large"])
def test_bad_imports_name_the_field_and_register_nothing(case, tmp_path, tracking_uri):
    from mlflow import MlflowClient

    src = make_llama(tmp_path / "src", vocab_pad=-12 if case == "vocab_too_large" else 0)
    cfg_path = src / "config.json"
    cfg = json.loads(cfg_path.read_text())
    expect = {"model_type": "model_type", "attention_bias": "attention_bias", "missing_weights": "model.safetensors",
              "no_eos": "eos", "vocab_too_large": "vocab"}[case]
    if case == "model_type":
        cfg["model_type"] = "gpt_neox"
    elif case == "attention_bias":
        cfg["attention_bias"] = True
    elif case == "missing_weights":
        (src / "model.safetensors").unlink()
    elif case == "no_eos":
        tc = json.loads((src / "tokenizer_config.json").read_text())
        tc.pop("eos_token", None)
        (src / "tokenizer_config.json").write_text(json.dumps(tc))
        (src / "special_tokens_map.json").unlink(missing_ok=True)
        (src / "generation_config.json").unlink(missing_ok=True)
        cfg.pop("eos_token_id", None)
    # vocab_too_large: the tokenizer's 512 tokens, 500 embedding rows
    cfg_path.write_text(json.dumps(cfg))
    r = rpt("models", "import", str(src), "--name", f"bad-{case}", "--tracking-uri", tracking_uri, ok=False)
    assert r.returncode == 2, r.stderr[-2000:]
    assert expect in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not MlflowClient(tracking_uri).search_registered_models(f"name = 'bad-{case}'")
