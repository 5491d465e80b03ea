"""LLM-Streamline's top boundary: the window ending at the last layer scored against the final-norm output (parity)."""

from __future__ import annotations

import pytest
import torch

from conftest import REPO, tiny_model
from layerfold.config import compose
from layerfold.methods import LayerMajorUnsupported, MethodContext, compress, get_method
from layerfold.scoring.top_boundary import final_norm_cosine


def model_with_norm():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.norm.weight.copy_(torch.linspace(0.2, 3.0, model.config.hidden_size))  # not a constant: cosines see it
    return model


def calibration() -> torch.Tensor:
    return torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(0))


def test_final_norm_cosine_is_hf_last_hidden_state() -> None:
    model, ids = model_with_norm(), calibration()
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    for start in range(4):
        expected = torch.nn.functional.cosine_similarity(hidden[start], hidden[-1], dim=-1).mean()
        assert final_norm_cosine(model, ids, start, batch_size=3) == pytest.approx(float(expected), abs=1e-6)
    with pytest.raises(ValueError, match="Layer 4 does not exist"):
        final_norm_cosine(model, ids, 4)


def test_only_the_last_window_is_rescored() -> None:
    scores = {}
    for boundary in ("pre_norm", "final_norm"):
        model, ids = model_with_norm(), calibration()
        plan = compress(MethodContext(model, None, ids, batch_size=2),
                        {"name": "streamline", "num_remove": 1, "replacement": "none", "top_boundary": boundary})
        scores[boundary] = plan["details"]["window_scores"]
    pre, post = scores["pre_norm"], scores["final_norm"]
    assert pre[:-1] == post[:-1] and len(pre) == 4
    with torch.no_grad():
        hidden = model_with_norm()(input_ids=calibration(), output_hidden_states=True).hidden_states
    expected = 0.5 + 0.5 * float(torch.nn.functional.cosine_similarity(hidden[3], hidden[-1], dim=-1).mean())
    assert post[-1] == pytest.approx(expected, abs=1e-6) and abs(post[-1] - pre[-1]) > 1e-4


def test_final_norm_is_refused_layer_major_before_scoring(monkeypatch) -> None:
    ctx = MethodContext(model_with_norm(), None, calibration())
    monkeypatch.setattr(MethodContext, "is_layer_major", property(lambda self: True))
    monkeypatch.setattr(MethodContext, "dense_stats", lambda self: pytest.fail("scored before the check"))
    with pytest.raises(LayerMajorUnsupported, match="top_boundary=final_norm"):
        compress(ctx, {"name": "streamline", "num_remove": 1, "top_boundary": "final_norm"})


def test_parity_preset_composes() -> None:
    _, cfg = get_method(compose(REPO / "conf", ["+experiment=streamline_code_parity"])["method"], {"num_layers": 30})
    assert cfg.top_boundary == "final_norm" and cfg.replacement == "transformer_layer"
    _, cfg = get_method(compose(REPO / "conf", ["method=streamline"])["method"], {"num_layers": 30})
    assert cfg.top_boundary == "pre_norm"
