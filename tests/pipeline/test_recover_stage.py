"""The recover stage on stories260K: every Streamline replacement and every recovery mode, through the stage scripts."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml

from conftest import REPO, data_dir, models_dir
from layerfold.config import compose
from layerfold.models import load_checkpoint
from layerfold.models.replacement import SIDE_FILE
from layerfold.models.sources import resolve_pointer
from transformers import AutoModelForCausalLM
from layerfold.stage import COMPRESSED, METRICS, RECOVERED, RECOVERY_STATE

TINY = [
    "model=stories260k",
    "data.calibration.num_blocks=4",
    "data.calibration.seq_len=64",
    "data.benchmarks=[]",
    "eval.lm_eval.tasks=[]",  # nothing prepared, nothing to score (validate checks the two agree)
    "method.num_remove=2",
    "eval.perplexity.seq_len=128",
]
# Only a training recovery group (not `none`) has these keys.
TINY_TRAINING = [
    "recovery.data.seq_len=64",
    "recovery.data.train_tokens=1024",
    "recovery.data.val_blocks=4",
    "recovery.max_steps=2",
    "recovery.batch_size=2",
    "recovery.log_every=1",
]


def write_params(overrides: list[str]) -> None:
    training = TINY_TRAINING if any(o.startswith("recovery=") and o != "recovery=none" for o in overrides) else []
    with open("params.yaml", "w") as handle:
        yaml.safe_dump(compose(REPO / "conf", [*TINY, *overrides, *training]), handle, sort_keys=False)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    if not (data_dir().is_dir() and (models_dir() / "stories260K").is_dir()):
        pytest.skip("local datasets/models folders not present")
    from pipeline import base, capture, data

    path = tmp_path_factory.mktemp("recover")
    mp = pytest.MonkeyPatch()
    mp.chdir(path)
    mp.setenv("LAYERFOLD_DATA_DIR", str(data_dir()))
    mp.setenv("LAYERFOLD_MODELS_DIR", str(models_dir()))
    write_params([])
    base.main()
    data.main()
    capture.main()
    yield path
    mp.undo()


def run_stages(workdir, monkeypatch, overrides: list[str]) -> dict:
    from pipeline import compress, recover

    monkeypatch.chdir(workdir)
    write_params(overrides)
    compress.main()
    recover.main()
    made, cost = (json.loads((METRICS / name).read_text()) for name in ("recover.json", "recover_time.json"))
    # what the run made and what it cost on this machine live apart: no time, memory or device in recover.json
    assert not {"wall_seconds", "train_seconds", "tokens_per_s", "peak_host_rss_mib", "device", "execution"} & set(made)
    assert all("seconds" not in phase for phase in made.get("phases", []))
    return {**made, **cost}


@pytest.mark.parametrize("replacement", ["transformer_layer", "ffn", "swiglu", "mlp"])
def test_streamline_replacements_train_and_reload(workdir, monkeypatch, replacement):
    metrics = run_stages(workdir, monkeypatch, ["method=streamline", "method.num_remove=2", f"method.replacement={replacement}", "recovery=distill"])
    assert metrics["trained"] and metrics["layers_trained"] == [json.loads((COMPRESSED / "plan.json").read_text())["details"]["replacement_layer"]]
    assert metrics["train_tokens_processed"] == 2 * 2 * 64 and metrics["tokens_per_s"] > 0
    assert metrics["data"]["train_tokens"] == 1024 and {m["source"] for m in metrics["data"]["mix"]} == {"c4", "wikitext2_train"}
    model, _ = load_checkpoint(RECOVERED)
    assert model.config.num_hidden_layers == 3
    assert (RECOVERED / SIDE_FILE).exists() == (replacement == "mlp")
    plan = json.loads((RECOVERED / "plan.json").read_text())
    assert plan["recovery"]["name"] == "distill"
    rows = list(csv.DictReader(open(METRICS / "recover_curve.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2] and all(float(r["loss"]) >= 0 for r in rows)
    assert not RECOVERY_STATE.exists()


def test_recovery_none_passes_the_compressed_model_through(workdir, monkeypatch):
    metrics = run_stages(workdir, monkeypatch, ["method=streamline", "method.num_remove=2", "method.replacement=none"])
    assert metrics == {"recovery": "none", "trained": False}
    # a real checkpoint (loads with from_pretrained), its pointer naming the checkpoint it is a copy of
    assert {"config.json", "model.safetensors", "plan.json", "pointer.json", "README.md"} <= {p.name for p in RECOVERED.iterdir()}
    assert resolve_pointer(RECOVERED) == RECOVERED / ".." / "compressed"
    stock = AutoModelForCausalLM.from_pretrained(RECOVERED)
    recovered, _ = load_checkpoint(RECOVERED)
    compressed, _ = load_checkpoint(COMPRESSED)
    ids = torch.randint(0, 512, (1, 16))
    assert torch.equal(recovered(ids).logits, compressed(ids).logits)
    assert torch.equal(stock(ids).logits, compressed(ids).logits)


@pytest.mark.parametrize("method, recovery", [
    ("streamline", "lm"), ("shortgpt", "lora"), ("shortgpt", "distill"), ("shortgpt", "come"),
])
def test_recovery_modes(workdir, monkeypatch, method, recovery):
    metrics = run_stages(workdir, monkeypatch, [f"method={method}", "method.num_remove=2", f"recovery={recovery}"])
    phases = [p["name"] for p in metrics["phases"]]
    assert phases == {"lm": ["end_to_end"], "lora": ["end_to_end"], "distill": ["local"], "come": ["local", "end_to_end"]}[recovery]
    compressed, _ = load_checkpoint(COMPRESSED)
    recovered, _ = load_checkpoint(RECOVERED)
    assert recovered.config.num_hidden_layers == compressed.config.num_hidden_layers == 3
    changed = [n for (n, a), b in zip(compressed.named_parameters(), recovered.parameters()) if not torch.equal(a, b)]
    assert changed and all(".layers." in n for n in changed)
    if recovery == "lora":
        assert len({n.split(".layers.")[1].split(".")[0] for n in changed}) == 3  # every layer healed
    assert metrics["val_lm_loss_after"] > 0 and metrics["peak_host_rss_mib"] > 0


@pytest.mark.parametrize("override, match", [("recovery.lr=0.0", "recovery.lr=0.0"), ("recovery.min_lr=0.5", "recovery.min_lr=0.5")])
def test_bad_recovery_setting_fails_before_writing_anything(workdir, monkeypatch, override, match):
    from pipeline import recover

    run_stages(workdir, monkeypatch, ["method=shortgpt", "recovery=none"])
    before = sorted(p.name for p in RECOVERED.iterdir())
    write_params(["method=shortgpt", "recovery=distill", override])
    with pytest.raises(ValueError, match=match):
        recover.main()
    assert sorted(p.name for p in RECOVERED.iterdir()) == before
