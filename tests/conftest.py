"""Shared test fixtures: the real-world files in ../shared/fixtures, and small tokenizers built offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No test may reach the network: the hub is unreachable here and in CI.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import app  # noqa: F401 - the application registers what "demo" means, as every entry point does

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
DATA = SHARED / "data"
TOKENIZERS = SHARED / "tokenizers"
FIXTURE_TOKENIZERS = ("qwen2.5-0.5b-instruct", "smollm-360m-instruct")


def require_fixtures() -> None:
    if not SHARED.is_dir():
        pytest.skip(f"the shared real-world fixtures are not here ({SHARED}); they sit beside the checkout")


@pytest.fixture(scope="session")
def fixture_data() -> Path:
    require_fixtures()
    return DATA


@pytest.fixture(scope="session", params=FIXTURE_TOKENIZERS)
def fixture_tokenizer(request):
    require_fixtures()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZERS / request.param)


@pytest.fixture(scope="session")
def qwen_tokenizer():
    require_fixtures()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZERS / "qwen2.5-0.5b-instruct")
