"""The reference log-probs a run trains against: from its directory, the cache, or computed (in shards)."""

from __future__ import annotations

import time

from core.atomic import write_safetensors
from core.config import Config
from core.distributed import SINGLE, Collective
from core.errors import DuetError
from core.events import Callback, Info, ReferenceReady, RunWarning
from core.fingerprint import cache_root, folder_fingerprint, model_fingerprint
from core.prepare import PreparedData
from core.progress import PhaseProgress
from core.reference import ReferenceLogps, load_or_compute, reference_key
from core.rundir import RunDirectory


def reference_logps(
    backend,
    data: PreparedData,
    config: Config,
    run_dir: RunDirectory,
    resumed: bool,
    emit: Callback,
    pad_multiple: int,
    collective: Collective = SINGLE,
) -> tuple[ReferenceLogps | None, ReferenceLogps | None]:
    """Each split's reference log-probs: a resumed run's own copy, else the cache, else computed and cached;
    rank 0 keeps a copy in the run directory so a resume never depends on the cache."""
    splits = {"train": data.train.tokenized, "eval": data.eval.tokenized if data.eval else []}
    stored = {name: run_dir.reference_dir / f"{name}.safetensors" for name in splits}
    if resumed and all(stored[n].is_file() for n, pairs in splits.items() if pairs):
        emit(ReferenceReady(message=f"reference log-probs: from the run directory {run_dir.reference_dir}"))
        return tuple(ReferenceLogps.from_file(stored[n]) if splits[n] else None for n in ("train", "eval"))  # type: ignore[return-value]
    start_adapter = config.model.adapter if config.model.reference == "start" else None
    if resumed and start_adapter:
        raise DuetError(
            f"{run_dir.path}: the reference log-probs are missing from the run directory and this run "
            "started from an adapter, so they cannot be recomputed after training began."
        )
    if config.model.adapter and not start_adapter:
        emit(Info(message=f"starting from the adapter {config.model.adapter}; the reference is the base model alone"))
    if start_adapter:
        emit(
            RunWarning(
                message=f"starting from the adapter {start_adapter}: the reference is the model "
                "with this adapter as loaded (computed before training), not the base model alone; the cache key "
                "includes the adapter."
            )
        )
    results: dict[str, ReferenceLogps | None] = {}
    for name, pairs in splits.items():
        results[name] = _split_reference(backend, name, pairs, data, config, emit, pad_multiple, collective)
        if results[name] is not None and collective.is_main:
            run_dir.reference_dir.mkdir(exist_ok=True)
            write_safetensors(stored[name], results[name].arrays())
    return results["train"], results["eval"]


def _split_reference(
    backend,
    name: str,
    pairs: list,
    data: PreparedData,
    config: Config,
    emit: Callback,
    pad_multiple: int,
    collective: Collective,
) -> ReferenceLogps | None:
    """One split's log-probs under the reference model, from the cache when its key (model, adapter, pairs,
    dtype) matches; computed in shards across ranks otherwise."""
    if not pairs:
        return None
    cache = cache_root(config.train.cache_dir)
    start_adapter = config.model.adapter if config.model.reference == "start" else None
    model_fp = model_fingerprint(backend.model_location, backend.model_revision, cache)
    adapter_fp = folder_fingerprint(start_adapter, cache) if start_adapter else None
    key = reference_key(model_fp, pairs, backend.info().dtype, adapter_fp)
    started = time.perf_counter()
    progress = PhaseProgress(emit, "reference", f"reference log-probs ({name})", len(collective.shard(pairs)))
    reference, hit = load_or_compute(
        backend,
        pairs,
        key,
        cache,
        batch_size=2 * config.train.batch_size,
        pad_id=data.chat.pad_id,
        adapter=bool(start_adapter),
        pad_to_multiple_of=pad_multiple,
        progress=progress,
        collective=collective,
    )
    where = cache / "reference" / f"{key}.safetensors"
    message = (
        f"reference log-probs ({name}, {len(pairs)} pairs): cache hit, reused {where}"
        if hit
        else f"reference log-probs ({name}, {len(pairs)} pairs): computed in "
        f"{time.perf_counter() - started:.1f}s, cached at {where}"
    )
    emit(ReferenceReady(split=name, cache_hit=hit, key=key, message=message))
    return reference
