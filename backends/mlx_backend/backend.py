"""The MLX backend: mlx-lm models and LoRA layers, the chunked response-only kernel, a compiled step, AdamW.

Sequence lengths are padded to multiples of ``pad_to_multiple_of`` and response positions to multiples of
``POSITION_BUCKET``, so the compiled step sees a handful of shapes instead of recompiling every batch.
Dropout draws from MLX's global generator, re-seeded before every micro-batch from (seed, micro-batch
count): resuming from a checkpoint replays exactly the same masks.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from backends.mlx_backend import lean_backward
from backends.mlx_backend.kernel import (
    Positions,
    chunked_token_logps,
    output_head,
    response_positions,
    sequence_logps,
    vocabulary_size,
)
from backends.mlx_backend.ops import MlxOps
from backends.mlx_backend.shared_prompts import (
    SharedInputs,
    can_share,
    padded_width,
    shared_inputs,
    shared_sequence_logps,
)
from core.adapters import Adapter, AdapterError, mlx_tensors, read_adapter, write_mlx
from core.backend import (
    Backend,
    BackendError,
    BackendInfo,
    StepResult,
    UpdateResult,
    check_adapter_fits,
    chunk_positions,
    peak_rss_bytes,
)
from core.batching import Batch, sharing_pays
from core.config import LoraConfig
from core.model_config import mlx_overrides, read_config
from core.models_io import ModelError, check_model_folder, load_tokenizer, resolve_model_path
from core.objectives import Objective, PolicyOutputs, evaluate, metric_names

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
LINEAR_TYPES = (nn.Linear, nn.QuantizedLinear)


def _to_numpy(array: mx.array) -> np.ndarray:
    return np.array(array.astype(mx.float32) if array.dtype == mx.bfloat16 else array)


class ModelConfigWarning(UserWarning):
    """A model config key that mlx-lm ignores: the MLX model may differ from transformers'."""


class MlxBackend(Backend):
    name = "mlx"
    pad_to_multiple_of = 32

    def __init__(
        self,
        dtype: str = "auto",
        gradient_checkpointing: bool = False,
        chunk_size: int | str = "auto",
        share_prompts: bool | str = "auto",
    ) -> None:
        self.share_prompts = share_prompts  # True, False or "auto": each prompt's keys and values once
        self.dtype_choice = dtype
        self.gradient_checkpointing = gradient_checkpointing
        self.chunk_size = chunk_size
        self.ops = MlxOps()
        self.model: Any = None
        self.tokenizer: Any = None
        self.optimizer: optim.AdamW | None = None
        self.lora: LoraConfig | None = None
        self.lora_keys: list[str] = []
        self.model_location = ""
        self.model_revision: str | None = None
        self._grads: Any = None
        self._base_seed = 0
        self._micro_batches = 0  # drives the dropout seed
        self._compiled: dict[tuple[int, float, bool, bool], Any] = {}
        self.config_warnings: list[str] = []  # what the model's config says that mlx-lm ignores
        self.batched_generation = True  # False: one row at a time (mlx-lm's generate_step), for benchmarks and checks

    # -- model and adapter ------------------------------------------------------------------------------

    def load_model(self, path: str, *, trust_remote_code: bool = False) -> None:
        from mlx_lm import load

        location = resolve_model_path(path)
        check_model_folder(location, path)
        self.tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        overrides = self._config_overrides(location)
        try:
            model, _ = load(location, tokenizer_config={"trust_remote_code": trust_remote_code}, model_config=overrides)
        except (OSError, ValueError, KeyError, FileNotFoundError) as exc:
            raise ModelError(
                f"model {path}: mlx-lm could not load it ({str(exc).splitlines()[0]}). A model folder "
                "needs config.json and *.safetensors weights of an architecture mlx-lm supports."
            ) from None
        self.use_model(model, self.tokenizer, location)

    def _config_overrides(self, location: str) -> dict[str, Any]:
        """What mlx-lm must be told on top of the model's config.json to build the model transformers builds
        (transformers 5 nests the rope base where mlx-lm does not look); warns about keys mlx-lm ignores."""
        folder = Path(location)
        if not folder.is_dir():  # a hub id: its config.json, from the same cache mlx-lm then loads from
            from huggingface_hub import hf_hub_download

            folder = Path(hf_hub_download(location, "config.json")).parent
        source, config = read_config(folder)
        overrides, notes = mlx_overrides(config, str(source))
        for note in notes:
            warnings.warn(note, ModelConfigWarning, stacklevel=3)
        self.config_warnings = notes
        return overrides

    def use_model(self, model: Any, tokenizer: Any, location: str) -> None:
        if self.dtype_choice != "auto":
            model.set_dtype(DTYPES[self.dtype_choice])
        model.freeze()
        if self.gradient_checkpointing:  # checkpointed layers recompute everything: mlx-lm's functions stay
            from mlx_lm.tuner.trainer import grad_checkpoint

            grad_checkpoint(model.layers[0])
        else:
            lean_backward.install(model)
        self.model, self.tokenizer, self.model_location = model, tokenizer, location

    def _block_linear_keys(self) -> list[str]:
        keys: set[str] = set()
        for block in self.model.layers:
            for name, module in block.named_modules():
                if isinstance(module, LINEAR_TYPES):
                    keys.add(name)
        return sorted(keys)

    def attach_lora(self, lora: LoraConfig, adapter_path: str | None = None) -> None:
        from mlx_lm.tuner.utils import linear_to_lora_layers

        available = self._block_linear_keys()
        if lora.target_modules == "all-linear":
            keys = available
        else:
            targets = [lora.target_modules] if isinstance(lora.target_modules, str) else lora.target_modules
            keys = [k for k in available if any(k == t or k.endswith("." + t) for t in targets)]
            if not keys:
                raise BackendError(
                    f"lora.target_modules {targets}: none of them is a linear layer of this model's "
                    f"blocks ({', '.join(available)})."
                )
        layers = len(self.model.layers) if lora.layers is None else min(lora.layers, len(self.model.layers))
        linear_to_lora_layers(
            self.model,
            layers,
            {"rank": lora.rank, "scale": lora.alpha / lora.rank, "dropout": lora.dropout, "keys": keys},
        )
        self.lora, self.lora_keys = lora, keys
        self._compiled.clear()
        if adapter_path is not None:
            self.load_adapter(Path(adapter_path))
        mx.eval(self.model.parameters())

    def trainable_parameters(self) -> int:
        return sum(v.size for _, v in tree_flatten(self.model.trainable_parameters()))

    def total_parameters(self) -> int:
        return sum(v.size for _, v in tree_flatten(self.model.parameters()))

    def _lora_layers(self):
        from mlx_lm.tuner.lora import LoRALinear

        return [m for _, m in self.model.named_modules() if isinstance(m, LoRALinear)]

    @contextlib.contextmanager
    def _adapter(self, enabled: bool):
        """With ``enabled`` False, every LoRA update is scaled by zero: exactly the base model."""
        if enabled:
            yield
            return
        layers = self._lora_layers()
        scales = [layer.scale for layer in layers]
        for layer in layers:
            layer.scale = 0.0
        try:
            yield
        finally:
            for layer, scale in zip(layers, scales, strict=True):
                layer.scale = scale

    # -- compute ----------------------------------------------------------------------------------------

    def _inputs(self, batch: Batch):
        positions = response_positions(batch.input_ids, batch.loss_mask)
        return mx.array(batch.input_ids), positions

    def _shares(self, batch: Batch) -> bool:
        """Whether this batch runs each prompt once ("auto": when that cuts the tokens to run by a fifth)."""
        if self.share_prompts is False or not can_share(self.model, self.gradient_checkpointing):
            return False
        if self.share_prompts is True:
            return True
        pairs = batch.num_pairs
        prompt_width = padded_width(int(batch.prompt_lengths[:pairs].max()))
        reply_width = padded_width(int(batch.response_lengths.max()))
        return sharing_pays(pairs * prompt_width + 2 * pairs * reply_width, batch.input_ids.size)

    def _logps_inputs(self, batch: Batch, shared: bool) -> tuple[Any, ...]:
        """The arrays the log-prob computation takes (a flat tuple, as a compiled step wants): shared-prompt
        inputs, or ids and gather positions."""
        if shared:
            inputs = shared_inputs(batch)
            return tuple(getattr(inputs, field.name) for field in fields(SharedInputs))
        input_ids, positions = self._inputs(batch)
        return (input_ids, positions.rows, positions.columns, positions.targets, positions.valid)

    @staticmethod
    def _logps(model: Any, arrays: tuple[Any, ...], shared: bool, token_logps: Any, sequences: int) -> mx.array:
        if shared:
            return shared_sequence_logps(model, SharedInputs(*arrays), token_logps, sequences)
        input_ids, rows, columns, targets, valid = arrays
        return sequence_logps(model, input_ids, Positions(rows, columns, targets, valid), token_logps)

    def _token_logps(self):
        chunk = chunk_positions(self.chunk_size, vocabulary_size(self.model))
        return chunked_token_logps(output_head(self.model), chunk)

    def sequence_logps(self, batch: Batch, *, adapter: bool = True) -> np.ndarray:
        self.model.eval()
        shared = self._shares(batch)
        arrays = self._logps_inputs(batch, shared)
        with self._adapter(adapter):
            logps = self._logps(self.model, arrays, shared, self._token_logps(), len(batch.response_lengths))
            mx.eval(logps)
        return np.array(logps).astype(np.float64)

    def _loss_function(self, objective: Objective, nll_weight: float, shared: bool):
        token_logps = self._token_logps()
        ops = self.ops

        def loss(model, arrays, lengths, reference, labels, has_reference, scale):
            logps = self._logps(model, arrays, shared, token_logps, lengths.shape[0])
            given = labels if objective.unpaired else None
            outputs = PolicyOutputs.from_rows(logps, lengths, reference if has_reference else None, given)
            result = evaluate(objective, ops, outputs, nll_weight)
            # One auxiliary array (metrics, then per-pair margins): mx.compile over value_and_grad fails
            # ("_Map_base::at") when a function returns several auxiliary arrays (mlx 0.32).
            metrics = mx.stack([result.metrics[k] for k in sorted(result.metrics)])
            return result.loss * scale, mx.concatenate([metrics, result.chosen_rewards - result.rejected_rewards])

        return loss

    def _step_function(self, objective: Objective, nll_weight: float, train: bool, shared: bool):
        key = (id(objective), nll_weight, train, shared)
        if key not in self._compiled:
            loss = self._loss_function(objective, nll_weight, shared)
            names = metric_names(objective, nll_weight)
            if train:
                value_and_grad = nn.value_and_grad(self.model, loss)

                def step(arrays, lengths, reference, labels, scale):
                    (_, aux), grads = value_and_grad(
                        self.model, arrays, lengths, reference, labels, not objective.is_reference_free, scale
                    )
                    return aux, grads
            else:

                def step(arrays, lengths, reference, labels, scale):
                    _, aux = loss(
                        self.model, arrays, lengths, reference, labels, not objective.is_reference_free, scale
                    )
                    return aux

            # The model state is an output too: nn.value_and_grad writes the traced parameters into the model
            # while tracing, and listing the state as an output puts the real arrays back after each call.
            state = [self.model.state, mx.random.state]
            self._compiled[key] = (mx.compile(step, inputs=state, outputs=state), names)
        return self._compiled[key]

    def _run(
        self,
        batch: Batch,
        objective: Objective,
        reference: np.ndarray | None,
        nll_weight: float,
        scale: float,
        train: bool,
    ):
        shared = self._shares(batch)
        step, names = self._step_function(objective, nll_weight, train, shared)
        arrays = self._logps_inputs(batch, shared)
        lengths = mx.array(batch.response_lengths.astype(np.float32))
        ref = mx.array(
            np.zeros(len(batch.response_lengths), np.float32)
            if reference is None
            else np.asarray(reference, np.float32)
        )
        pairs = len(batch.pair_indices)
        labels = mx.array(np.zeros(pairs, np.float32) if batch.labels is None else batch.labels.astype(np.float32))
        outputs = step(arrays, lengths, ref, labels, mx.array(scale, dtype=mx.float32))
        return outputs, names

    def forward_backward(
        self,
        batch: Batch,
        objective: Objective,
        reference: np.ndarray | None,
        nll_weight: float,
        scale: float,
        sync: bool = True,  # one process: nothing to synchronize
    ) -> StepResult:
        self.model.train()
        mx.random.seed(self._base_seed * 1_000_003 + self._micro_batches)
        self._micro_batches += 1
        (aux, grads), names = self._run(batch, objective, reference, nll_weight, scale, True)
        self._grads = grads if self._grads is None else tree_map(mx.add, self._grads, grads)
        mx.eval(aux, self._grads)
        return self._result(batch, names, aux)

    def evaluate(
        self, batch: Batch, objective: Objective, reference: np.ndarray | None, nll_weight: float
    ) -> StepResult:
        self.model.eval()
        aux, names = self._run(batch, objective, reference, nll_weight, 1.0, False)
        mx.eval(aux)
        return self._result(batch, names, aux)

    @staticmethod
    def _result(batch: Batch, names: list[str], aux: mx.array) -> StepResult:
        values = np.array(aux).astype(np.float64)
        metrics = dict(zip(names, values[: len(names)].tolist(), strict=True))
        return StepResult(metrics, values[len(names) :], batch.num_pairs, batch.num_tokens)

    def setup_optimizer(
        self, *, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ) -> None:
        # bias_correction: the same update as torch.optim.AdamW
        self.optimizer = optim.AdamW(
            learning_rate=0.0, betas=list(betas), eps=eps, weight_decay=weight_decay, bias_correction=True
        )
        self.optimizer.init(self.model.trainable_parameters())

    def apply_gradients(self, lr: float, max_grad_norm: float | None) -> UpdateResult:
        assert self.optimizer is not None, "setup_optimizer() first"
        grads = self._grads
        self._grads = None
        if max_grad_norm is not None:
            grads, norm = optim.clip_grad_norm(grads, max_grad_norm)
        else:
            norm = mx.sqrt(sum(mx.sum(g.astype(mx.float32) ** 2) for _, g in tree_flatten(grads)))
        grad_norm = float(norm)
        if not np.isfinite(grad_norm):
            return UpdateResult(grad_norm, False)
        self.optimizer.learning_rate = mx.array(lr, dtype=mx.float32)
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.parameters(), self.optimizer.state)
        return UpdateResult(grad_norm, True)

    def discard_gradients(self) -> None:
        self._grads = None

    # -- state ------------------------------------------------------------------------------------------

    def _adapter_object(self) -> Adapter:
        assert self.lora is not None
        a, b = {}, {}
        for name, value in tree_flatten(self.model.trainable_parameters()):
            module, leaf = name.rsplit(".", 1)
            (a if leaf == "lora_a" else b)[module] = _to_numpy(value).T.copy()
        return Adapter(a, b, self.lora.rank, self.lora.alpha / self.lora.rank, self.lora.dropout, self.model_location)

    def adapter_weights(self) -> dict[str, np.ndarray]:
        from core.adapters import peft_tensors

        return peft_tensors(self._adapter_object())

    def save_adapter(self, directory: Path) -> None:
        write_mlx(Path(directory), self._adapter_object(), len(self.model.layers))

    def load_adapter(self, directory: Path) -> None:
        try:
            adapter = read_adapter(directory)
            tensors, _ = mlx_tensors(adapter, len(self.model.layers))
        except AdapterError as exc:
            raise BackendError(str(exc)) from None
        current = dict(tree_flatten(self.model.trainable_parameters()))
        # zero matrices stand for layers a PEFT adapter left alone (layers_to_transform): not an extra
        extra = [k for k in tensors if k not in current and np.any(tensors[k])]
        expected = {k: tuple(v.shape) for k, v in current.items()}
        check_adapter_fits(directory, expected, {k: tuple(v.shape) for k, v in tensors.items()}, extra)
        dtype = next(iter(current.values())).dtype
        self.model.load_weights([(k, mx.array(tensors[k]).astype(dtype)) for k in current], strict=False)
        mx.eval(self.model.parameters())

    def optimizer_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        assert self.optimizer is not None
        arrays = {k: _to_numpy(v) for k, v in tree_flatten(self.optimizer.state)}
        return arrays, {"keys": sorted(arrays)}

    def load_optimizer_state(self, arrays: dict[str, np.ndarray], scalars: dict[str, Any]) -> None:
        assert self.optimizer is not None
        self.optimizer.state = tree_unflatten([(k, mx.array(v)) for k, v in arrays.items()])

    def rng_state(self) -> dict[str, np.ndarray]:
        return {"mlx_seed_and_micro_batches": np.array([self._base_seed, self._micro_batches], dtype=np.int64)}

    def set_rng_state(self, state: dict[str, np.ndarray]) -> None:
        self._base_seed, self._micro_batches = (int(x) for x in state["mlx_seed_and_micro_batches"])

    def seed(self, seed: int) -> None:
        self._base_seed = seed
        self._micro_batches = 0
        mx.random.seed(seed)

    # -- generation and reporting -----------------------------------------------------------------------

    def generate(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        seed: int = 0,
        adapter: bool = True,
        stop_ids: list[int] | None = None,
        pad_id: int = 0,
        top_p: float = 1.0,
        top_k: int = 0,
        stream: Callable[[int, int], None] | None = None,
        seeds: list[int] | None = None,
        temperatures: list[float] | None = None,
        repetition_penalty: float = 1.0,
    ) -> list[list[int]]:
        from backends.mlx_backend.generation import sample
        from core.sampling import sampling_rows

        self.model.eval()
        rows = sampling_rows(
            len(prompts),
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            seeds=seeds,
            temperatures=temperatures,
            repetition_penalty=repetition_penalty,
        )
        with self._adapter(adapter):  # every row decoded together, each from its own key chain (see generation)
            replies = sample(
                self.model,
                prompts,
                rows,
                max_new_tokens=max_new_tokens,
                stop_ids=stop_ids or [],
                stream=stream,
                batched=self.batched_generation,
            )
        mx.random.seed(self._base_seed * 1_000_003 + self._micro_batches)  # training draws stay as they were
        return replies

    def info(self) -> BackendInfo:
        import importlib.metadata

        device = str(mx.default_device())
        details: dict[str, Any] = {"mlx": importlib.metadata.version("mlx")}
        with contextlib.suppress(Exception):  # CPU builds report no Metal keys
            details.update({k: v for k, v in mx.device_info().items() if isinstance(v, (int, float, str))})
        dtype = "?"
        with contextlib.suppress(StopIteration):
            dtype = str(next(v for _, v in tree_flatten(self.model.parameters())).dtype).replace("mlx.core.", "")
        return BackendInfo("mlx", device, dtype, details)

    def memory(self) -> dict[str, float]:
        figures = {"peak_rss": peak_rss_bytes()}
        with contextlib.suppress(Exception):
            figures["peak_device"] = float(mx.get_peak_memory())
            figures["device"] = float(mx.get_active_memory())
        return figures
