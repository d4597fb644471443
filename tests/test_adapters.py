"""Adapters travel between ecosystems: PEFT ↔ mlx-lm, and merged models, checked on logits (1e-4)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

pytest.importorskip("mlx.core")

import mlx.core as mx
from mlx_lm import generate as mlx_generate
from mlx_lm import load as mlx_load
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.adapters import Adapter, AdapterError, read_adapter, write_mlx
from core.cli import main as duet
from core.errors import DuetError
from core.export import export
from core.run import run
from tests.helpers import DEMO_MODEL, quick_config

TOL = 1e-4


@pytest.fixture(scope="module")
def token_rows() -> np.ndarray:
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    texts = [
        "<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\nMango.<|im_end|>\n",
        "<|im_start|>user\nTell me a city.<|im_end|>\n<|im_start|>assistant\nOh, what a fun question!",
    ]
    ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    width = min(len(i) for i in ids)
    return np.array([i[:width] for i in ids], dtype=np.int64)


def torch_logits(model, rows: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(rows)).logits.float().numpy()


def mlx_logits(model_path: Path, rows: np.ndarray, adapter: Path | None = None) -> np.ndarray:
    model, _ = mlx_load(str(model_path), adapter_path=None if adapter is None else str(adapter))
    return np.array(model(mx.array(rows)).astype(mx.float32))


def close(a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_allclose(a, b, rtol=TOL, atol=TOL * np.abs(b).max())


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("torch-run")
    return run(quick_config(tmp, train={"max_steps": 3, "lr": 5e-3}), console=Console(file=io.StringIO()))


@pytest.fixture(scope="module")
def mlx_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlx-run")
    config = quick_config(tmp, model={"backend": "mlx"}, train={"max_steps": 3, "lr": 5e-3})
    return run(config, console=Console(file=io.StringIO()))


def test_a_torch_adapter_exported_to_mlx_gives_the_same_logits_in_mlx_lm(torch_run, token_rows, tmp_path) -> None:
    expected = torch_logits(
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DEMO_MODEL), torch_run.adapter_dir), token_rows
    )
    out = export(torch_run.run_dir, "mlx", tmp_path / "mlx")
    assert {p.name for p in out.iterdir()} >= {"adapters.safetensors", "adapter_config.json"}
    close(mlx_logits(DEMO_MODEL, token_rows, out), expected)
    base = torch_logits(AutoModelForCausalLM.from_pretrained(DEMO_MODEL), token_rows)
    assert np.abs(expected - base).max() > 1e-3  # the adapter does change the logits


def test_an_mlx_run_saves_mlx_lm_format_that_mlx_lm_loads_and_generates_with(mlx_run) -> None:
    adapter = mlx_run.adapter_dir
    assert (adapter / "adapters.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["model"] == config["base_model"] == str(Path(DEMO_MODEL).resolve())  # mlx-lm's key, and ours
    model, tokenizer = mlx_load(str(DEMO_MODEL), adapter_path=str(adapter))
    text = mlx_generate(
        model, tokenizer, "<|im_start|>user\nName a tree.<|im_end|>\n<|im_start|>assistant\n", max_tokens=8
    )
    assert isinstance(text, str) and text


def test_an_mlx_adapter_exported_to_peft_gives_the_same_logits_in_peft(mlx_run, token_rows, tmp_path) -> None:
    expected = mlx_logits(DEMO_MODEL, token_rows, mlx_run.adapter_dir)
    out = export(mlx_run.run_dir, "peft", tmp_path / "peft")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DEMO_MODEL), out)
    close(torch_logits(loaded, token_rows), expected)


@pytest.mark.parametrize("which", ["torch", "mlx"])
def test_merged_models_equal_their_adapter_models_in_both_libraries(
    which, torch_run, mlx_run, token_rows, tmp_path
) -> None:
    result = torch_run if which == "torch" else mlx_run
    if which == "torch":
        expected = torch_logits(
            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DEMO_MODEL), result.adapter_dir), token_rows
        )
    else:
        expected = mlx_logits(DEMO_MODEL, token_rows, result.adapter_dir)
    merged = export(result.run_dir, "merged", tmp_path / "merged")
    close(torch_logits(AutoModelForCausalLM.from_pretrained(merged), token_rows), expected)
    close(mlx_logits(merged, token_rows), expected)
    assert AutoTokenizer.from_pretrained(merged).chat_template


def test_peft_adapters_on_some_layers_convert_exactly(token_rows, tmp_path) -> None:
    """layers_to_transform {0, 2} of 4 becomes an mlx-lm adapter on the last 4 with zeros on 1 and 3."""
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(DEMO_MODEL),
        PeftLoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "down_proj"], layers_to_transform=[0, 2]),
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    peft_dir = tmp_path / "peft"
    model.save_pretrained(peft_dir)
    expected = torch_logits(model, token_rows)
    mlx_dir = export(peft_dir, "mlx", tmp_path / "mlx", base_model=str(DEMO_MODEL))
    close(mlx_logits(DEMO_MODEL, token_rows, mlx_dir), expected)
    back = export(mlx_dir, "peft", tmp_path / "back")
    close(
        torch_logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DEMO_MODEL), back), token_rows),
        expected,
    )
    original, returned = read_adapter(peft_dir), read_adapter(back)
    for module in original.a:
        np.testing.assert_array_equal(returned.a[module], original.a[module])
        np.testing.assert_array_equal(returned.b[module], original.b[module])
    assert not any(np.any(returned.b[m]) for m in returned.b if m not in original.b)


def test_export_never_overwrites_without_force_and_leaves_nothing_on_failure(torch_run, tmp_path, capsys) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert duet(["export", str(torch_run.run_dir), "--to", "peft", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert duet(["export", str(torch_run.run_dir), "--to", "peft", str(out), "--force"]) == 0
    assert (out / "adapter_model.safetensors").is_file() and not (out / "keep.txt").exists()
    with pytest.raises(DuetError, match="no such folder"):
        export(torch_run.run_dir, "merged", tmp_path / "fails", base_model=str(tmp_path / "no-base"))
    assert not (tmp_path / "fails").exists()
    assert not list(tmp_path.glob(".tmp-*"))


def test_wrong_base_model_is_named(torch_run, tmp_path) -> None:
    from tests.helpers import tiny_causal_lm

    wrong = tmp_path / "wrong"
    tiny_causal_lm("llama", vocab=512).save_pretrained(wrong)
    with pytest.raises(AdapterError, match=r"has shape .* but the adapter's update has .*another base model"):
        export(torch_run.adapter_dir, "merged", tmp_path / "m", base_model=str(wrong))
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".tmp-*"))  # failed inside: nothing left


def test_mlx_adapters_record_the_base_model_under_mlx_lms_key(tmp_path) -> None:
    """mlx-lm's own adapter_config.json names the base model under "model"; tools that follow it find ours."""
    module = "model.layers.0.self_attn.q_proj"
    adapter = Adapter({module: np.ones((2, 8), np.float32)}, {module: np.ones((8, 2), np.float32)}, 2, 2.0)
    adapter.base_model = "Qwen/Qwen2.5-0.5B-Instruct"
    write_mlx(tmp_path, adapter, num_layers=1)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["model"] == config["base_model"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert read_adapter(tmp_path).base_model == "Qwen/Qwen2.5-0.5B-Instruct"
