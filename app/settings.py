"""A run's settings: the config from a file, a dict or the demo, overrides on top, local paths made absolute."""

from __future__ import annotations

import copy
from pathlib import Path

from core.config import Config, apply_override, config_from_dict, read_yaml

RESUME_OVERRIDABLE = (
    "train.max_steps",
    "train.epochs",
    "train.eval_every",
    "train.save_every",
    "train.log_every",
    "train.keep_checkpoints",
    "train.nonfinite",
    "train.max_skipped_steps",
)


def demo_config_path() -> Path:
    from models.tiny_chat import CONFIG_FILE

    return CONFIG_FILE


def resolve_config(config: Config | str | Path | dict | None, overrides: list[str] | tuple[str, ...]) -> Config:
    """A Config object, a YAML path, a dict, or None for the demo; overrides apply on top."""
    if isinstance(config, Config):
        if not overrides:
            return absolute_paths(copy.deepcopy(config).validate())
        data = config.to_dict()
    elif isinstance(config, dict):
        data = dict(config)
    else:
        data = read_yaml(demo_config_path() if config is None else config)
    for override in overrides:
        apply_override(data, override)
    return absolute_paths(config_from_dict(data).validate())


def absolute_paths(config: Config) -> Config:
    """Local paths become absolute, so the config saved in the run directory means the same from anywhere
    (a resume from another working directory). Hub ids and "demo" stay as they are."""

    def local(value: str | None) -> str | None:
        if value is None or value == "demo":
            return value
        path = Path(value).expanduser()
        return str(path.resolve()) if path.exists() else value

    config.model.path = local(config.model.path) or config.model.path
    config.model.adapter = local(config.model.adapter)
    config.data.train = local(config.data.train) or config.data.train
    config.data.eval = local(config.data.eval)
    if config.data.chat_template not in ("auto", "plain", "chatml") and "{" not in config.data.chat_template:
        config.data.chat_template = local(config.data.chat_template) or config.data.chat_template
    config.rounds.prompts = local(config.rounds.prompts)
    config.rounds.eval_prompts = local(config.rounds.eval_prompts)
    config.evaluation.prompts = local(config.evaluation.prompts)
    config.judge.model = local(config.judge.model)
    config.judge.template = local(config.judge.template)
    if config.judge.rule:  # path/to/rules.py or path/to/rules.py:function
        file, colon, function = (
            config.judge.rule.rpartition(":") if ".py:" in config.judge.rule else (config.judge.rule, "", "")
        )
        config.judge.rule = f"{local(file)}{colon}{function}"
    config.train.output_dir = str(Path(config.train.output_dir).expanduser().resolve())
    if config.train.cache_dir:
        config.train.cache_dir = str(Path(config.train.cache_dir).expanduser().resolve())
    return config
