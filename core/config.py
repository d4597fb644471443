"""Run configuration: small dataclasses per section, loaded from YAML plus dotted command-line overrides.

Unknown keys and bad values raise ``ConfigError`` naming the key (and the closest known key), so a typo
never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from core.errors import ConfigError
from core.objectives import OBJECTIVES

# Every field carries one line of help in its metadata: ``duet config`` and ``python -m core.run --help`` list
# the keys from it, so the listing cannot drift from the dataclasses (a test checks that none lacks help).


def about(help: str) -> dict[str, str]:
    return {"help": help}


def option(default: Any, help: str) -> Any:
    """A field with an immutable default and its help (mutable defaults: ``field(default_factory=...)``)."""
    return field(default=default, metadata=about(help))


@dataclass
class ModelConfig:
    path: str = option(
        "demo", 'local model folder, hub id (e.g. Qwen/Qwen2.5-0.5B-Instruct), or "demo" (the built-in tiny chat model)'
    )
    backend: str = option(
        "auto", "torch, mlx or an installed backend plugin; auto: MLX on Apple silicon, torch elsewhere"
    )
    device: Literal["auto", "cuda", "mps", "cpu"] = option(
        "auto", "torch backend only: cuda, mps or cpu; auto: the first of them this machine has"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto",
        "weights and compute dtype; auto: bfloat16 on CUDA, else float32. bfloat16 on a CPU with AMX or "
        "AVX512-BF16: bf16 weights, products under autocast, fp32 LoRA weights (faster, less memory, not exact)",
    )
    adapter: str | None = option(None, "start from an existing adapter (PEFT or mlx-lm folder); null: a fresh LoRA")
    trust_remote_code: bool = option(False, "let a model folder's own Python code run (only for models you trust)")
    gradient_checkpointing: bool = option(
        False, "recompute activations in the backward pass: less memory, slower steps"
    )
    logprob_chunk_size: int | Literal["auto"] = option(
        "auto",
        "reply positions per LM-head chunk in the log-prob kernel; auto: torch on a CPU 512 (the vocabulary in "
        "cache-sized blocks), otherwise a chunk's logits near 128 MiB",
    )
    share_prompts: bool | Literal["auto"] = option(
        "auto", "compute each pair's prompt once for both replies; auto: when it saves work"
    )
    padding_free: bool | Literal["auto"] = option(
        "auto",
        "torch: run a batch's sequences one by one at their own lengths, computing no padding; auto: on a CPU, "
        "for sequences of 128 tokens or more, when padding is a tenth of the batch or prompts are shared. A "
        "training step then runs one pair at a time, so only one pair's activations are kept for its backward",
    )
    reference: Literal["start", "base"] = option(
        "start", "with model.adapter: the reference is the model as it starts (with that adapter), or the base alone"
    )
    threads: int | Literal["auto"] = option(
        "auto",
        "CPU threads for the torch backend; auto: OMP_NUM_THREADS if set, else the cores this process may use, "
        "fewer while other processes keep cores busy (looked at again between steps)",
    )
    host_memory: Literal["lean", "fast"] = option(
        "lean",
        "torch on a Linux CPU: lean hands each freed activation block back to the system at once (the lowest "
        "peak); fast keeps freed blocks for the next step (SmolLM2: steps about a quarter faster, peak about a "
        "fifth higher)",
    )

    def validate(self) -> None:
        if self.logprob_chunk_size != "auto":
            _positive("model.logprob_chunk_size", self.logprob_chunk_size)
        if self.threads != "auto":
            _positive("model.threads", self.threads)
        if not self.path.strip():
            raise ConfigError("model.path is empty: give a local model folder, a hub id, or 'demo'.")
        if not self.backend.strip():
            raise ConfigError("model.backend is empty: auto, torch, mlx, or the name of an installed backend plugin.")


@dataclass
class DataConfig:
    train: str = option("demo", 'training data: a file, dataset folder, hub id, or "demo" (the bundled preference set)')
    eval: str | None = option(
        None, "a separate eval set (same forms as data.train); null: hold out data.eval_fraction of train"
    )
    eval_fraction: float = option(
        0.0, "share of the training pairs held out for evaluation when data.eval is null (0: none)"
    )
    format: str = option(
        "auto",
        "auto (detected from the rows), or sharegpt, llamafactory_v1, ultrafeedback, conversational, explicit, "
        "alpaca, implicit, hh_rlhf, or unpaired (KTO's rated replies)",
    )
    columns: dict[str, str] = field(
        default_factory=dict,
        metadata=about("your column names for Duet's, e.g. {prompt: question, chosen: answer_good}"),
    )
    split: str = option("train", "the split to read from a dataset folder or hub id")
    skip_invalid: bool = option(False, "skip bad rows (counted in the report) instead of stopping at the first")
    drop_duplicates: bool = option(False, "drop repeated identical pairs (otherwise they count twice, with a warning)")
    chat_template: str = option(
        "auto", "auto (the tokenizer's) | plain | chatml | path to a .jinja file | the template itself"
    )
    max_length: int = option(
        1024, "most tokens of prompt + reply; longer pairs are cut (prompts from the left, replies from the right)"
    )
    max_prompt_length: int | None = option(
        512, "most prompt tokens (cut from the left); null: only data.max_length limits it"
    )
    unpaired: bool = option(
        False, "KTO: split each preference pair into a desirable (chosen) and an undesirable (rejected) example"
    )

    def validate(self) -> None:
        from core.data.formats import FORMATS_BY_NAME

        _positive("data.max_length", self.max_length)
        if self.max_prompt_length is not None:
            _positive("data.max_prompt_length", self.max_prompt_length)
            if self.max_prompt_length >= self.max_length:
                raise ConfigError(
                    f"data.max_prompt_length ({self.max_prompt_length}) must be below data.max_length "
                    f"({self.max_length}), or no reply token would fit."
                )
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}.")
        if self.format != "auto" and self.format not in FORMATS_BY_NAME:
            raise ConfigError(
                f"data.format '{self.format}' is unknown{_suggest(self.format, FORMATS_BY_NAME)}; "
                f"choose auto or one of {', '.join(FORMATS_BY_NAME)}."
            )
        known = {
            "prompt",
            "chosen",
            "rejected",
            "system",
            "conversations",
            "instruction",
            "input",
            "history",
            "chosen_messages",
            "rejected_messages",
            "score_chosen",
            "score_rejected",
            "completion",
            "label",
        }
        for duet_name in self.columns:
            if duet_name not in known:
                raise ConfigError(
                    f"data.columns.{duet_name}: not a column Duet reads"
                    f"{_suggest(duet_name, known)}; the names are {', '.join(sorted(known))}."
                )


@dataclass
class LoraConfig:
    rank: int = option(16, "LoRA rank r")
    alpha: float = option(32.0, "LoRA alpha: the update is scaled by alpha / rank")
    dropout: float = option(0.0, "dropout on the LoRA layers' input, in [0, 1)")
    target_modules: list[str] | str = field(
        default="all-linear",
        metadata=about(
            "all-linear (every linear layer of the blocks, not the LM head) or module names, e.g. [q_proj, v_proj]"
        ),
    )
    layers: int | None = option(None, "adapt only the last N transformer blocks; null: all of them")

    def validate(self) -> None:
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            self.target_modules = [self.target_modules]  # one module name, not a pattern
        if not self.target_modules:
            raise ConfigError("lora.target_modules is empty: name the modules to adapt, or use all-linear.")
        _positive("lora.rank", self.rank)
        _positive("lora.alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}.")
        if self.layers is not None:
            _positive("lora.layers", self.layers)


def _objective_help() -> str:
    return f"the loss: {', '.join(OBJECTIVES)} (each described below)"


def _naming(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


@dataclass
class ObjectiveConfig:
    name: str = option("dpo", _objective_help())
    beta: float | None = option(None, "the preference strength β; null: the objective's usual value (0.1; SimPO 2.0)")
    gamma: float | None = option(None, "SimPO only: the target reward margin γ, absolute")
    gamma_beta_ratio: float | None = option(
        None, "SimPO only: γ relative to β, γ = ratio × β (null: 0.5, unless gamma is set)"
    )
    label_smoothing: float = option(0.0, "ε, the assumed rate of flipped preference labels (cDPO), in [0, 0.5)")
    robust: bool = option(False, "with label_smoothing: robust DPO's unbiased loss instead of cDPO's")
    nll_weight: float = option(0.0, "weight of a per-token NLL loss on the chosen replies, added to the objective")
    desirable_weight: float | None = option(
        None, "KTO only: λ_D, the weight of desirable (thumbs-up) examples (null: 1)"
    )
    undesirable_weight: float | None = option(
        None, "KTO only: λ_U, the weight of undesirable (thumbs-down) examples (null: 1)"
    )

    def validate(self) -> None:
        """What every objective's declaration says (its name, whether it takes β, which options), then the
        objective's own checks."""
        if self.name not in OBJECTIVES:
            raise ConfigError(
                f"objective.name: '{self.name}' is not allowed{_suggest(self.name, OBJECTIVES)}; "
                f"choose one of {', '.join(OBJECTIVES)}."
            )
        declared = OBJECTIVES[self.name]
        if self.beta is not None and declared.default_beta is None:
            raise ConfigError(f"objective.beta: {self.name} takes no β; remove the setting (or set it to null).")
        if self.beta is not None:
            _positive("objective.beta", self.beta)
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"objective.label_smoothing must be in [0, 0.5), got {self.label_smoothing}.")
        given = {
            "label_smoothing": bool(self.label_smoothing),
            "robust": self.robust,
            "gamma": self.gamma is not None or self.gamma_beta_ratio is not None,
            "desirable_weight": self.desirable_weight is not None,
            "undesirable_weight": self.undesirable_weight is not None,
        }
        for option_name, set_here in given.items():
            if set_here and option_name not in declared.options:
                takers = [name for name, cls in OBJECTIVES.items() if option_name in cls.options]
                key = "gamma / gamma_beta_ratio apply" if option_name == "gamma" else f"{option_name} applies"
                only = " only" if len(takers) == 1 else ""
                raise ConfigError(f"objective.{key} to {_naming(takers)}{only}, not {self.name}.")
        if self.nll_weight < 0:
            raise ConfigError(f"objective.nll_weight must be ≥ 0, got {self.nll_weight}.")
        for key in ("desirable_weight", "undesirable_weight"):
            if getattr(self, key) is not None:
                _positive(f"objective.{key}", getattr(self, key))
        declared.check_config(self)

    @property
    def resolved_beta(self) -> float:
        """β as given, or the objective's declared default (0.0 for an objective that takes none)."""
        if self.beta is not None:
            return self.beta
        default = OBJECTIVES[self.name].default_beta
        return 0.0 if default is None else default


@dataclass
class TrainConfig:
    batch_size: int = option(4, "pairs per optimizer micro-step")
    grad_accum: int = option(1, "micro-steps accumulated into each optimizer step")
    epochs: float = option(1.0, "passes over the training pairs (fractions allowed); train.max_steps overrides it")
    max_steps: int | None = option(
        None, "optimizer steps to train; overrides train.epochs (null: as many as the epochs take)"
    )
    lr: float = option(5e-5, "peak learning rate (AdamW)")
    schedule: Literal["cosine", "linear", "constant"] = option(
        "cosine", "learning-rate decay after the warm-up: cosine, linear or constant"
    )
    warmup_steps: int | None = option(None, "warm-up steps; null: train.warmup_ratio of all steps")
    warmup_ratio: float = option(0.1, "share of the steps spent warming up when train.warmup_steps is null")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float | None = option(1.0, "clip the gradient norm to this; null: no clipping")
    seed: int = option(0, "seed for the LoRA initialization, the data order and dropout")
    group_by_length: bool = option(True, "batch pairs of similar length together (less padding)")
    shuffle: bool = option(
        True, "a new random order each epoch; false: the data's own order in consecutive batches (no grouping)"
    )
    eval_every: int | None = option(None, "evaluate every N steps; null: only at the end")
    sample_replies: int = option(
        0, "after training: greedy replies of the model before and after to this many held-out prompts, side by side"
    )
    sample_max_new_tokens: int = option(96, "the longest sampled reply (train.sample_replies), in tokens")
    save_every: int | None = option(None, "write a checkpoint every N steps; null: only at the end")
    log_every: int = option(1, "log training metrics every N steps")
    keep_checkpoints: int = option(2, "newest checkpoints kept in the run directory")
    output_dir: str = option("runs", "the folder run directories are created in")
    cache_dir: str | None = option(None, "reference log-probs and token caches; null: ~/.cache/duet")
    run_name: str | None = option(None, "the run directory's name; null: a timestamp")
    nonfinite: Literal["stop", "skip"] = option("stop", "when a loss or gradient is NaN/inf: stop, or skip the step")
    distributed_timeout: float = option(
        600.0, "under torchrun: seconds a rank waits for the others before the job fails"
    )
    max_skipped_steps: int = option(10, "with train.nonfinite=skip: fail once more steps than this were skipped")

    def validate(self) -> None:
        _positive("train.batch_size", self.batch_size)
        _positive("train.grad_accum", self.grad_accum)
        _positive("train.epochs", self.epochs)
        _positive("train.lr", self.lr)
        if self.max_steps is not None:
            _positive("train.max_steps", self.max_steps)
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps must be ≥ 0, got {self.warmup_steps}.")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay must be ≥ 0, got {self.weight_decay}.")
        if self.max_grad_norm is not None:
            _positive("train.max_grad_norm", self.max_grad_norm)
        _positive("train.distributed_timeout", self.distributed_timeout)
        _positive("train.sample_max_new_tokens", self.sample_max_new_tokens)
        if self.sample_replies < 0:
            raise ConfigError(f"train.sample_replies must be ≥ 0, got {self.sample_replies}.")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"train.keep_checkpoints must be ≥ 1, got {self.keep_checkpoints}.")
        for key in ("eval_every", "save_every", "log_every"):
            value = getattr(self, key)
            if value is not None:
                _positive(f"train.{key}", value)
        if self.run_name is not None:
            _safe_name("train.run_name", self.run_name)


@dataclass
class SamplingConfig:
    temperature: float = option(1.0, "sampling temperature of the answers (0: greedy)")
    second_temperature: float | None = option(
        None, "the second answer's temperature when it should differ; null: sampling.temperature for both"
    )
    top_p: float = option(1.0, "nucleus sampling: keep the most likely tokens up to this total probability (1: all)")
    top_k: int = option(0, "keep only the k most likely tokens (0: all)")
    repetition_penalty: float = option(
        1.0, "above 1 discourages tokens already in the prompt or the answer (transformers' rule); 1: off"
    )
    max_new_tokens: int = option(128, "the longest answer, in tokens")
    seed: int = option(0, "base seed of the answers; each answer's own seed is derived from it and recorded")
    precision: Literal["auto", "float32", "bfloat16"] = option(
        "auto",
        "the precision answers are generated in on a CPU: bfloat16 (a bf16 copy of the model, adapter merged: about "
        "2× faster where the CPU does bf16 natively), float32 (exact: greedy equals transformers' generate); auto: "
        "bfloat16 on a CPU with AMX or AVX512-BF16",
    )

    def validate(self) -> None:
        for key, value in (("temperature", self.temperature), ("second_temperature", self.second_temperature)):
            if value is not None and value < 0:
                raise ConfigError(f"sampling.{key} must be ≥ 0 (0: greedy), got {value}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"sampling.top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise ConfigError(f"sampling.top_k must be ≥ 0 (0: no limit), got {self.top_k}.")
        _positive("sampling.max_new_tokens", self.max_new_tokens)
        _positive("sampling.repetition_penalty", self.repetition_penalty)


@dataclass
class JudgeConfig:
    kind: Literal["human", "rule", "model"] = option(
        "human", "who judges collected answers: human (the Collect screen), rule (judge.rule) or model (judge.model)"
    )
    rule: str | None = option(
        None, "a Python file with prefer(prompt, a, b) -> 'a'|'b'|'tie' or score(prompt, answer) -> float"
    )
    model: str | None = option(None, "the judge model (any model Duet loads) for judge.kind=model")
    template: str | None = option(
        None, "a text file with the judge's question, using {prompt}, {a} and {b}; null: Duet's pairwise question"
    )
    max_new_tokens: int = option(8, "the longest judge-model answer, in tokens (the verdict is its first A or B)")

    def validate(self) -> None:
        if self.kind == "rule" and not self.rule:
            raise ConfigError("judge.kind is rule but judge.rule is not set: name a .py file with prefer() or score().")
        if self.kind == "model" and not self.model:
            raise ConfigError("judge.kind is model but judge.model is not set: name the judge model's folder.")
        _positive("judge.max_new_tokens", self.max_new_tokens)


@dataclass
class RoundsConfig:
    count: int = option(0, "rounds of sample → judge → train → evaluate (0: train once on data.train, no rounds)")
    prompts: str | None = option(None, "the prompts to sample from (a text or JSON lines file); null: data.train's")
    eval_prompts: str | None = option(
        None, "held-out prompts judged after each round; null: data.eval's, else every 8th prompt of rounds.prompts"
    )
    prompts_per_round: int = option(32, "prompts sampled and judged in each round")
    eval_samples: int = option(4, "answers per held-out prompt after each round (seeded alike in every round)")
    samples: int = option(2, "answers per prompt; with more than 2 the judge's best is chosen over its worst")
    policy: Literal["reference", "current"] = option(
        "current", "sample from the reference (DPO's recipe) or from the policy trained so far (on-policy)"
    )
    reference: Literal["base", "previous"] = option(
        "previous", "each round's reference: the base model, or the policy the round starts from"
    )
    steps: int = option(20, "optimizer steps per round")

    def validate(self) -> None:
        if self.count < 0:
            raise ConfigError(f"rounds.count must be ≥ 0, got {self.count}.")
        _positive("rounds.prompts_per_round", self.prompts_per_round)
        _positive("rounds.steps", self.steps)
        _positive("rounds.eval_samples", self.eval_samples)
        if self.samples < 2:
            raise ConfigError(f"rounds.samples must be ≥ 2 (a pair needs two answers), got {self.samples}.")


@dataclass
class EvaluationConfig:
    at_end: bool = option(False, "evaluate the tuned model against the base when training ends (duet eval RUN)")
    prompts: str | None = option(None, "held-out prompts to answer (a text or JSON lines file); null: the eval split's")
    max_prompts: int = option(64, "at most this many held-out prompts (the first ones, in file order)")
    samples: int = option(2, "answers per prompt from each model, sampled with the sampling section's settings")
    greedy: bool = option(False, "one greedy answer per prompt from each model instead of samples")
    kl_samples: int = option(2, "answers per prompt sampled at temperature 1 to estimate KL from the base")
    examples: int = option(4, "prompts shown with both answers in the report")

    def validate(self) -> None:
        _positive("evaluation.max_prompts", self.max_prompts)
        _positive("evaluation.samples", self.samples)
        if self.kl_samples < 0:
            raise ConfigError(f"evaluation.kl_samples must be ≥ 0 (0: no KL estimate), got {self.kl_samples}.")
        if self.examples < 0:
            raise ConfigError(f"evaluation.examples must be ≥ 0, got {self.examples}.")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig, metadata=about("the base model and where it runs"))
    data: DataConfig = field(default_factory=DataConfig, metadata=about("the preference data and how it is tokenized"))
    lora: LoraConfig = field(default_factory=LoraConfig, metadata=about("the LoRA adapter trained"))
    objective: ObjectiveConfig = field(
        default_factory=ObjectiveConfig, metadata=about("the preference objective and its hyper-parameters")
    )
    train: TrainConfig = field(
        default_factory=TrainConfig, metadata=about("optimization, evaluation, checkpoints and output")
    )
    sampling: SamplingConfig = field(
        default_factory=SamplingConfig, metadata=about("how answers are sampled for collecting and rounds")
    )
    judge: JudgeConfig = field(default_factory=JudgeConfig, metadata=about("who prefers one answer over the other"))
    rounds: RoundsConfig = field(
        default_factory=RoundsConfig, metadata=about("iterative rounds: sample, judge, train, evaluate")
    )
    evaluation: EvaluationConfig = field(
        default_factory=EvaluationConfig, metadata=about("what training changed: tuned against base (duet eval)")
    )

    def validate(self) -> Config:
        sections = (self.model, self.data, self.lora, self.objective, self.train, self.sampling, self.judge)
        for section in (*sections, self.rounds, self.evaluation):
            section.validate()
        if self.data.unpaired and not OBJECTIVES[self.objective.name].unpaired:
            takers = [name for name, cls in OBJECTIVES.items() if cls.unpaired]
            raise ConfigError(
                f"data.unpaired splits pairs into rated examples for {_naming(takers)}; objective "
                f"{self.objective.name} trains on the pairs themselves. Remove data.unpaired, or set "
                f"objective.name={takers[0]}."
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------------------------------------------------
# Listing: every key, its default and its help, generated from the dataclasses above


@dataclass(frozen=True)
class ConfigOption:
    key: str  # dotted, e.g. train.max_steps
    default: Any
    help: str


def config_sections() -> list[tuple[str, str, list[ConfigOption]]]:
    """(section name, its help, its options) for every section of ``Config``, in declaration order."""
    defaults = Config()
    sections = []
    for part in dataclasses.fields(Config):
        values = getattr(defaults, part.name)
        options = [
            ConfigOption(f"{part.name}.{f.name}", getattr(values, f.name), f.metadata.get("help", ""))
            for f in dataclasses.fields(values)
        ]
        sections.append((part.name, part.metadata.get("help", ""), options))
    return sections


def yaml_value(value: Any) -> str:
    """A value as it is written in YAML or a key=value override (null, true, [q_proj, v_proj], {})."""
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).removesuffix("...\n").strip()


def config_keys_text() -> str:
    """Every key with its default and help, aligned in columns, one section after another."""
    sections = config_sections()
    options = [option for _, _, part in sections for option in part]
    key_width = max(len(option.key) for option in options)
    value_width = max(len(yaml_value(option.default)) for option in options)
    lines = []
    for name, help, part in sections:
        lines.append(f"{name}: {help}")
        lines += [f"  {o.key:<{key_width}}  {yaml_value(o.default):<{value_width}}  {o.help}" for o in part]
    lines.append("objectives (objective.name), as each declares itself:")
    for name, declared in OBJECTIVES.items():
        beta = "no β" if declared.default_beta is None else f"β {declared.default_beta}"
        reference = "reference-free" if declared.is_reference_free else "reference model"
        lines.append(f"  {name:<{key_width}}  {beta}, {reference}: {declared.summary}")
    return "\n".join(lines)


def config_yaml() -> str:
    """A complete config file with every default, each key commented with its help."""
    lines = ["# Duet run configuration: every key at its default (python -m core.run --config this.yaml)."]
    for name, help, part in config_sections():
        lines.append(f"{name}:  # {help}")
        lines += [f"  {o.key.split('.', 1)[1]}: {yaml_value(o.default)}  # {o.help}" for o in part]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A validated ``Config`` from an optional YAML file and ``key.sub=value`` overrides (applied last)."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(path)
    for override in overrides:
        apply_override(data, override)
    return config_from_dict(data).validate()


def read_yaml(path: str | Path) -> dict[str, Any]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"config file {path}: no such file.")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or exc
        raise ConfigError(f"{where}: not valid YAML ({problem}).") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path}: not UTF-8 text.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path}: expected a mapping of sections (model, data, ...), found {type(data).__name__}."
        )
    return data


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply ``section.key=value`` (the value parsed as YAML) to a nested dict, in place."""
    key, sep, raw_value = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{override}': expected key=value, e.g. objective.beta=0.05.")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError:
        value = raw_value
    parts = key.strip().split(".")
    node = data
    for index, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{override}': '{'.'.join(parts[: index + 1])}' is not a section.")
        node = child
    node[parts[-1]] = value


def config_from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, data, "")


def _build(cls: type, data: Any, prefix: str) -> Any:
    name = prefix.rstrip(".") or "the config"
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: expected a mapping, got {_describe(data)}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [key for key in data if key not in fields]
    if unknown:
        key = unknown[0]
        raise ConfigError(
            f"unknown key '{prefix}{key}'{_suggest(str(key), fields, prefix)}. "
            f"Known keys here: {', '.join(prefix + f for f in fields)}."
        )
    values = {}
    for key, value in data.items():
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            values[key] = _build(kind, value if value is not None else {}, f"{prefix}{key}.")
        else:
            values[key] = _coerce(value, kind, f"{prefix}{key}")
    return cls(**values)


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``kind``; convert where the YAML spelling is harmless."""
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if type(value) in args:  # the value already has one of the allowed types: keep it as it is
            return _coerce(value, type(value), key)
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(exc)
        raise (
            errors[-1]
            if len(errors) == 1
            else ConfigError(f"{key}: {_describe(value)} is not {' or '.join(_type_text(a) for a in args)}.")
        )
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                f"{key}: '{value}' is not allowed{_suggest(str(value), [str(a) for a in args])}; "
                f"choose one of {', '.join(map(str, args))}."
            )
        return value
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_describe(value)}.")
        return [_coerce(item, args[0], f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_describe(value)}.")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {_describe(value)}.")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected a whole number, got {_describe(value)}.")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-5" as a string
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {_describe(value)}.")
    if kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected text, got {_describe(value)}.")
    raise TypeError(f"unsupported config annotation {kind!r} for {key}")


def _type_text(kind: Any) -> str:
    if typing.get_origin(kind) is Literal:  # the words themselves (model.share_prompts: true/false or auto)
        return " or ".join(map(str, typing.get_args(kind)))
    return {int: "a whole number", float: "a number", str: "text", bool: "true/false", type(None): "null"}.get(
        kind, getattr(kind, "__name__", str(kind))
    )


def _describe(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"


def _suggest(word: str, options, prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key} must be > 0, got {value}.")


def _safe_name(key: str, name: str) -> None:
    """A name that becomes a folder name: no path separators, no '..', not absolute."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("~"):
        raise ConfigError(f"{key} '{name}' must be a plain folder name (no '/', '\\', '..' or '~').")
