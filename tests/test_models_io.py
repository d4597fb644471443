"""Hub ids without a network: a clear error within seconds, or the HF cache used offline."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from huggingface_hub import constants

from core.models_io import HUB_TIMEOUT, ModelError, load_tokenizer, resolve_model_path
from tests.helpers import DEMO_MODEL

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused at once


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", UNREACHABLE)
    for variable in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)
    return cache


def test_a_hub_id_under_hf_hub_offline_fails_at_once_naming_the_id(empty_cache, monkeypatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    started = time.monotonic()
    with pytest.raises(ModelError) as error:
        resolve_model_path("nobody/no-such-model")
    assert time.monotonic() - started < 1.0
    message = str(error.value)
    assert "model nobody/no-such-model: the Hugging Face hub cannot be reached (HF_HUB_OFFLINE is set)" in message
    assert "local model folder" in message and "unset HF_HUB_OFFLINE" in message


def test_an_unreachable_hub_fails_within_seconds_not_after_retries(empty_cache) -> None:
    started = time.monotonic()
    with pytest.raises(ModelError) as error:
        load_tokenizer("nobody/no-such-model")  # the path a run takes first; it used to retry for ~50 s
    assert time.monotonic() - started < HUB_TIMEOUT + 2
    message = str(error.value)
    assert f"nobody/no-such-model: the Hugging Face hub cannot be reached (no answer from {UNREACHABLE}" in message
    assert "local model folder" in message and "connect to the network" in message


def test_a_model_in_the_hf_cache_still_loads_without_the_hub(empty_cache) -> None:
    repo = empty_cache / "models--someone--tiny-chat"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(DEMO_MODEL / name, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    started = time.monotonic()
    assert resolve_model_path("someone/tiny-chat") == "someone/tiny-chat"
    assert constants.HF_HUB_OFFLINE  # the cache is read without trying the network first
    tokenizer = load_tokenizer("someone/tiny-chat")
    assert tokenizer("Hi")["input_ids"] and time.monotonic() - started < HUB_TIMEOUT + 2
