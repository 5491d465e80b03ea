"""The evaluation caches hold data only: the token cache (npz with a sha256) and lm-eval's request cache
(gzip JSON with a sha256). A pickle planted where either is read runs nothing and is ignored with a
message; a damaged or edited file is ignored; what is written reads back exactly."""

from __future__ import annotations

import gzip
import json
import logging
import pickle
from array import array
from pathlib import Path

import numpy as np
import pytest

from layerfold.evaluation import request_cache
from layerfold.evaluation.lm import load_token_cache, save_token_cache


class _Payload:
    """Unpickling this creates ``marker``: the proof that a loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _planted(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(_Payload(marker)))
    pickle.loads(path.read_bytes()).close()  # the file really is code: a pickle loader runs it
    assert marker.exists()
    marker.unlink()


def test_token_cache_round_trip(tmp_path: Path) -> None:
    cache = {("hello world", None): array("i", [5, 6, 7]), ("", False): array("i"), ("é\n", True): array("i", [2**31 - 1])}
    path = tmp_path / "tokens-x.npz"
    save_token_cache(path, cache)
    loaded: dict = {}
    assert load_token_cache(path, loaded) == 3
    assert loaded == cache and all(isinstance(v, array) for v in loaded.values())


def test_a_pickle_planted_as_the_token_cache_runs_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path, marker = tmp_path / "tokens-x.npz", tmp_path / "ran"
    _planted(path, marker)
    loaded: dict = {}
    with caplog.at_level(logging.WARNING):
        assert load_token_cache(path, loaded) == 0
    assert not marker.exists() and loaded == {}
    assert f"Ignoring token cache {path}" in caplog.text and "pickled" in caplog.text


def test_an_edited_token_cache_fails_its_check(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "tokens-x.npz"
    save_token_cache(path, {("a", None): array("i", [1, 2])})
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["tokens"] = np.array([1, 3], dtype=np.int32)  # another token, same layout
    np.savez(path, **arrays)
    loaded: dict = {}
    with caplog.at_level(logging.WARNING):
        assert load_token_cache(path, loaded) == 0
    assert loaded == {} and "does not match its sha256" in caplog.text


def _instances():
    from lm_eval.api.instance import Instance

    doc = {"question": "2 + 2?", "choices": ["3", "4"], "answer": 1}
    context = "Question: 2 + 2?\nAnswer:"
    return [[Instance("loglikelihood", doc, (context, f" {c}"), i, ("task_x", 0, 1)) for i, c in enumerate(doc["choices"])],
            [Instance("loglikelihood", {"text": "a b"}, ("a", " b"), 0, ("task_x", 1, 1))]]


def test_request_cache_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lm_eval.caching import cache

    monkeypatch.setattr(cache, "PATH", str(tmp_path))
    groups = _instances()
    request_cache.save("requests-task_x-0shot-rank0-world_size1-tokenizer", groups)
    loaded = request_cache.load("requests-task_x-0shot-rank0-world_size1-tokenizer", cache=True)
    assert [[(i.request_type, i.doc, i.arguments, i.idx, i.metadata) for i in g] for g in loaded] == \
        [[(i.request_type, i.doc, i.arguments, i.idx, i.metadata) for i in g] for g in groups]
    assert request_cache.load("requests-task_x-0shot-rank0-world_size1-tokenizer", cache=False) is None
    # the shared context is stored once
    payload = gzip.decompress(request_cache.cache_path("requests-task_x-0shot-rank0-world_size1-tokenizer").read_bytes())
    assert payload.count(b"Question: 2 + 2?") == 1  # in the string table once, not once per choice


def test_a_pickle_planted_in_the_request_cache_runs_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    from lm_eval.caching import cache

    monkeypatch.setattr(cache, "PATH", str(tmp_path))
    key, marker = "requests-task_x-0shot-rank0-world_size1-tokenizer", tmp_path / "ran"
    _planted(Path(cache._cache_file_path(key)), marker)  # where lm-eval's own cache (dill) would read it
    _planted(request_cache.cache_path(key), marker)  # and where layerfold's reads
    request_cache.install()
    import lm_eval.api.task as task_module

    with caplog.at_level(logging.WARNING):
        assert task_module.load_from_cache(file_name=key, cache=True) is None
    assert not marker.exists()
    assert "Ignoring request cache" in caplog.text


def test_an_edited_request_cache_fails_its_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lm_eval.caching import cache

    monkeypatch.setattr(cache, "PATH", str(tmp_path))
    key = "requests-task_x-0shot-rank0-world_size1-tokenizer"
    request_cache.save(key, _instances())
    path = request_cache.cache_path(key)
    header, _, payload = gzip.decompress(path.read_bytes()).partition(b"\n")
    path.write_bytes(gzip.compress(header + b"\n" + payload.replace(b"2 + 2", b"2 + 3")))
    assert request_cache.load(key, cache=True) is None
    assert json.loads(header)["format"] == request_cache.FORMAT
