"""Config: YAML plus dotted overrides; unknown keys and bad values name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from core.config import Config, config_yaml, load_config, yaml_value
from core.errors import ConfigError
from core.objectives import build_objective


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides(tmp_path: Path) -> None:
    path = write(
        tmp_path, "objective:\n  name: simpo\n  beta: 2.5\ntrain:\n  lr: 1.0e-6\ndata:\n  columns: {prompt: question}\n"
    )
    config = load_config(path, ["objective.gamma_beta_ratio=0.4", "train.lr=1e-5", "lora.target_modules=q_proj"])
    assert config.objective.name == "simpo" and build_objective(config.objective).gamma == pytest.approx(1.0)
    assert config.train.lr == 1e-5  # "1e-5" is a string in YAML 1.1; numbers are still read as numbers
    assert config.lora.target_modules == ["q_proj"]
    assert config.data.columns == {"prompt": "question"}
    assert load_config(None).to_dict() == Config().to_dict()
    # the resolved config round-trips through YAML
    again = tmp_path / "again.yaml"
    again.write_text(config.to_yaml())
    assert load_config(again).to_dict() == config.to_dict()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["objective.bta=0.1"], r"unknown key 'objective\.bta' \(did you mean 'objective\.beta'\?\)"),
        (["trian.lr=0.1"], r"unknown key 'trian' \(did you mean 'train'\?\)"),
        (["objective.name=dpoo"], r"objective\.name: 'dpoo' is not allowed \(did you mean 'dpo'\?\)"),
        (["objective.beta=0"], r"objective\.beta must be > 0, got 0\.0"),
        (["objective.beta=-1"], r"objective\.beta must be > 0"),
        (["train.lr=0"], r"train\.lr must be > 0"),
        (["train.lr=fast"], r"train\.lr: expected a number, got str 'fast'"),
        (["train.batch_size=2.5"], r"train\.batch_size: expected a whole number, got float 2\.5"),
        (["model.gradient_checkpointing=maybe"], r"model\.gradient_checkpointing: expected true or false"),
        (["data.max_prompt_length=2048", "data.max_length=1024"], r"data\.max_prompt_length \(2048\) must be below"),
        (["objective.name=dpo", "objective.gamma=0.5"], r"objective\.gamma / gamma_beta_ratio apply to simpo only"),
        (["objective.name=simpo", "objective.gamma=0.5", "objective.gamma_beta_ratio=0.5"], r"not both"),
        (["objective.label_smoothing=0.5"], r"objective\.label_smoothing must be in \[0, 0\.5\)"),
        (["objective.name=ipo", "objective.robust=true"], r"objective\.robust applies to dpo and dpo_norm"),
        (["objective.name=sft", "objective.beta=0.5"], r"objective\.beta: sft takes no β; remove the setting"),
        (["objective.robust=true"], r"objective\.robust needs objective\.label_smoothing > 0"),
        (["lora.target_modules=[]"], r"lora\.target_modules is empty"),
        (["data.columns.answer=x"], r"data\.columns\.answer: not a column Duet reads"),
        (["data.format=sharegtp"], r"data\.format 'sharegtp' is unknown \(did you mean 'sharegpt'\?\)"),
        (["train.run_name=../escape"], r"train\.run_name '\.\./escape' must be a plain folder name"),
        (["lora.dropout=1.5"], r"lora\.dropout must be in \[0, 1\)"),
        (["model.logprob_chunk_size=0"], r"model\.logprob_chunk_size must be > 0"),
        (["model.logprob_chunk_size=big"], r"model\.logprob_chunk_size"),
        (["train"], r"override 'train': expected key=value"),
        (["train.lr.x=1"], r"train\.lr: expected a number, got dict"),
        (["train.lr=1", "train.lr.x=1"], r"'train\.lr' is not a section"),
    ],
)
def test_bad_values_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file .*nope\.yaml: no such file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"run\.yaml:2: not valid YAML"):
        load_config(write(tmp_path, "train:\n\tlr: 1\n"))
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match=r"train: expected a mapping, got int 5"):
        load_config(write(tmp_path, "train: 5\n"))


def test_the_kernel_chunk_size_is_auto_or_a_number() -> None:
    from core.backend import CHUNK_LOGITS, chunk_positions

    assert load_config(None).model.logprob_chunk_size == "auto"
    assert load_config(None, ["model.logprob_chunk_size=256"]).model.logprob_chunk_size == 256
    # auto: the largest power of two whose [positions, vocab] logits fit the budget, within [32, 4096]
    assert chunk_positions("auto", 151_936) == 128  # Qwen2.5
    assert chunk_positions("auto", 32_000) == 1024  # Llama 2
    assert chunk_positions("auto", 262_144) == 128  # Gemma 3: exactly the budget
    assert chunk_positions("auto", 512) == 4096  # the demo: capped
    assert chunk_positions("auto", 10**7) == 32  # floor
    for vocab in (512, 32_000, 151_936, 262_144):
        chosen = chunk_positions("auto", vocab)
        assert chosen * vocab <= CHUNK_LOGITS or chosen == 32
        assert chosen == 4096 or 2 * chosen * vocab > CHUNK_LOGITS
    assert chunk_positions(300, 151_936) == 300


def _every_field() -> list[tuple[str, dataclasses.Field]]:
    """(dotted key, field) for every section and every key of every section."""
    found = []
    for part in dataclasses.fields(Config):
        found.append((part.name, part))
        found += [(f"{part.name}.{f.name}", f) for f in dataclasses.fields(getattr(Config(), part.name))]
    return found


def test_every_config_field_has_one_line_of_help() -> None:
    for key, spec in _every_field():
        text = spec.metadata.get("help", "")
        assert text.strip() and "\n" not in text, f"{key} has no one-line help text (option(default, help))"


def test_every_key_is_listed_with_its_default_and_help(capsys) -> None:
    from core.cli import main as duet
    from core.run import build_parser

    listings = {"duet config": None, "python -m core.run --help": build_parser().format_help()}
    assert duet(["config"]) == 0
    listings["duet config"] = capsys.readouterr().out
    defaults = Config()
    for name, text in listings.items():
        lines = text.splitlines()
        for key, spec in _every_field():
            if "." not in key:
                assert any(line.startswith(f"{key}: {spec.metadata['help']}") for line in lines), (name, key)
                continue
            section, field_name = key.split(".")
            default = yaml_value(getattr(getattr(defaults, section), field_name))
            assert any(
                line.split()[:2] == [key, default] and line.rstrip().endswith(spec.metadata["help"]) for line in lines
            ), f"{name} does not list {key} = {default} with its help"
    assert "train.max_steps" in listings["python -m core.run --help"]  # the key the issue could not find


def test_the_commented_yaml_is_a_complete_config_at_its_defaults(tmp_path: Path, capsys) -> None:
    from core.cli import main as duet

    assert duet(["config", "--yaml"]) == 0
    text = capsys.readouterr().out
    assert text == config_yaml()
    assert yaml.safe_load(text) == Config().to_dict()
    assert load_config(write(tmp_path, text)).to_dict() == Config().to_dict()
    for key, spec in _every_field():
        assert f"# {spec.metadata['help']}" in text, key


def test_the_format_help_names_every_format() -> None:
    from core.data.formats import FORMATS_BY_NAME

    help_text = {f.name: f for f in dataclasses.fields(Config().data)}["format"].metadata["help"]
    assert all(name in help_text for name in FORMATS_BY_NAME)
