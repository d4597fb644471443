"""Content fingerprints: what a cached result depends on, so a cache hit is always a right answer."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from core.tokenization import TokenizedPair

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".npz", ".gguf")
_CHUNK = 1 << 20


def cache_root(configured: str | None = None) -> Path:
    """Where Duet keeps caches: ``train.cache_dir``, else $DUET_CACHE_DIR, else $XDG_CACHE_HOME/duet."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("DUET_CACHE_DIR"):
        return Path(os.environ["DUET_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "duet"


def file_digest(path: Path, memo: dict[str, str] | None = None) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime) so large weights are hashed once."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    if memo is not None and key in memo:
        return memo[key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    if memo is not None:
        memo[key] = digest.hexdigest()
    return digest.hexdigest()


def folder_fingerprint(folder: str | Path, cache_dir: Path | None = None) -> str:
    """A model or adapter folder: its config files and every weight file, by content."""
    folder = Path(folder)
    memo_path = cache_dir / "file-digests.json" if cache_dir else None
    memo: dict[str, str] = {}
    if memo_path is not None and memo_path.is_file():
        try:
            memo = json.loads(memo_path.read_text())
        except (OSError, ValueError):
            memo = {}
    digest = hashlib.sha256()
    for file in sorted(folder.iterdir()):
        if file.is_file() and (file.suffix in WEIGHT_SUFFIXES or file.suffix == ".json"):
            digest.update(file.name.encode() + b"\0" + file_digest(file, memo).encode() + b"\0")
    if memo_path is not None:
        from core.atomic import remove_stale_temporaries, write_json

        memo_path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(memo_path.parent)
        write_json(memo_path, memo)
    return digest.hexdigest()


def model_fingerprint(location: str, commit: str | None = None, cache_dir: Path | None = None) -> str:
    """A local folder by content; a hub id by its name and the commit transformers resolved."""
    path = Path(location)
    if path.is_dir():
        return folder_fingerprint(path, cache_dir)
    return hashlib.sha256(f"hub:{location}@{commit or 'unknown'}".encode()).hexdigest()


def tokens_fingerprint(pairs: Iterable[TokenizedPair]) -> str:
    """Every token id of every pair (which captures the data, tokenizer, template and truncation)."""
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(pair.index.to_bytes(8, "little", signed=False))
        for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
            digest.update(len(ids).to_bytes(4, "little"))
            digest.update(ids.astype("<i4").tobytes())
    return digest.hexdigest()


def combine(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()
