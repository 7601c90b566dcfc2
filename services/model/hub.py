"""Models by name: a hub name in `model.path` becomes a local directory once, on the driver.

`resolve_model(path, cache_dir)` returns a local directory unchanged. Anything else is taken as a
hub name (`Qwen/Qwen2.5-Math-7B`) and fetched with `huggingface_hub.snapshot_download` into the
hub cache (`model.cache_dir`, else $HF_HUB_CACHE, $HF_HOME/hub, ~/.cache/huggingface/hub), before
any engine or learner starts; every role is then given the snapshot's local directory, so vLLM,
the HF engine, the learners and the policy export read files, never the network. With
HF_HUB_OFFLINE=1 only the cache is read (`local_files_only`). A name that cannot be had (offline
and not cached, unknown, gated, no network) stops the run with `ModelUnavailable`, which names the
model, the cache and the ways out, instead of a stack trace from deep inside an engine.

The environment is read at call time, not at import (huggingface_hub's constants are fixed when
it is imported), so a run's HF_HUB_OFFLINE / HF_HUB_CACHE / HF_ENDPOINT are the ones in force.
"""

from __future__ import annotations

import os
from pathlib import Path

# weights of other frameworks, and the original (non-HF) checkpoints some repos ship beside them
IGNORE_PATTERNS = ["*.msgpack", "*.h5", "*.ot", "*.onnx", "*.onnx_data", "*.gguf", "*.tflite", "onnx/*", "original/*"]
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_TRUE = {"1", "true", "yes", "on"}


class ModelUnavailable(RuntimeError):
    """`model.path` is neither a local directory nor a hub name this machine can get; the message says how to fix it."""


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or the older TRANSFORMERS_OFFLINE) is set to a true value now."""
    return any(os.environ.get(var, "").strip().lower() in _TRUE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The hub cache a name is downloaded to: `cache_dir`, else huggingface_hub's own default, read now."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser().resolve()
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return (Path(home).expanduser() / "hub").resolve()


def cache_configured(cache_dir: str | os.PathLike | None) -> bool:
    """Whether the cache was chosen (model.cache_dir, HF_HUB_CACHE or HF_HOME), not the per-user default."""
    return cache_dir is not None or any(os.environ.get(v) for v in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"))


def is_hub_name(path: str) -> bool:
    """`org/name` or `name` (a valid repo id) that is not an existing local path."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if os.path.exists(os.path.expanduser(path)) or path.startswith(("~", ".")):
        return False
    try:
        validate_repo_id(path)
    except HFValidationError:
        return False
    return True


def resolve_model(path: str, cache_dir: str | os.PathLike | None = None, revision: str | None = None,
                  on_cluster: bool | None = None) -> str:
    """The local directory of `path`: itself when it is one, else the hub snapshot of the name
    (downloaded now when the hub is reachable and HF_HUB_OFFLINE is not set).

    On a cluster (RAY_ADDRESS set) the snapshot must be where every node finds it, so a name is
    refused while the cache is the per-user default: set model.cache_dir (or HF_HUB_CACHE/HF_HOME).
    """
    if os.path.isdir(os.path.expanduser(path)):
        return path
    if not is_hub_name(path):
        raise ModelUnavailable(f"model.path {path!r} is not a directory on this machine (and not a hub name such as "
                               "Qwen/Qwen2.5-Math-7B): point it at a checkpoint directory (config.json, weights, "
                               "tokenizer) or at a hub name")
    cache = hub_cache_dir(cache_dir)
    on_cluster = bool(os.environ.get("RAY_ADDRESS")) if on_cluster is None else on_cluster
    if on_cluster and not cache_configured(cache_dir):
        raise ModelUnavailable(
            f"model.path {path!r} is a hub name and this run is on a cluster (RAY_ADDRESS is set), but the hub cache is "
            f"the per-user default {cache}, which the other nodes do not see: set model.cache_dir to a directory every "
            "node mounts (the GPU recipe uses /app/runs/hf-cache on the runs volume), or HF_HUB_CACHE")
    return _snapshot(path, cache, revision)


def _snapshot(name: str, cache: Path, revision: str | None) -> str:
    from huggingface_hub import snapshot_download

    offline = hub_offline()
    try:
        local = snapshot_download(name, revision=revision, cache_dir=str(cache), local_files_only=offline,
                                  ignore_patterns=IGNORE_PATTERNS, endpoint=os.environ.get("HF_ENDPOINT") or None)
    except Exception as exc:  # any failure here means the same thing to the run: no model (cause chained)
        raise ModelUnavailable(_unavailable(name, cache, revision, offline, exc)) from exc
    missing = _missing_files(Path(local))
    if missing:
        raise ModelUnavailable(f"the snapshot of {name!r} in the hub cache {local} has no {' and no '.join(missing)}: "
                               "an interrupted or filtered download; download it again (without HF_HUB_OFFLINE), or "
                               "point model.path at a complete local copy")
    return str(local)


def _unavailable(name: str, cache: Path, revision: str | None, offline: bool, exc: Exception) -> str:
    rev = f" (revision {revision})" if revision else ""
    why = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    folder = cache / ("models--" + name.replace("/", "--"))
    fixes = (f"download it where the hub is reachable (`hf download {name} --cache-dir {cache}`, or run once without "
             "HF_HUB_OFFLINE) and copy that cache here; or set HF_HUB_OFFLINE=1 with model.cache_dir (or HF_HUB_CACHE) "
             "naming a cache that holds it; or point model.path at a local copy of the checkpoint")
    if offline:
        return (f"model {name!r}{rev} is not in the hub cache {cache} (no complete snapshot under {folder}) and "
                f"HF_HUB_OFFLINE is set, so nothing is downloaded. Fix: {fixes}")
    return (f"model {name!r}{rev} could not be downloaded into the hub cache {cache} ({type(exc).__name__}: {why}). "
            f"Check the name (and HF_TOKEN for a gated model) and the network. Fix: {fixes}")


def _missing_files(local: Path) -> list[str]:
    missing = []
    if not (local / "config.json").is_file():
        missing.append("config.json")
    if not any(local.glob("*.safetensors")) and not any(local.glob("*.bin")):
        missing.append("weights (*.safetensors or *.bin)")
    if not any((local / f).is_file() for f in _TOKENIZER_FILES):
        missing.append(f"tokenizer ({', '.join(_TOKENIZER_FILES)})")
    return missing


def cached_file(name: str, filename: str, cache_dir: str | os.PathLike | None = None,
                revision: str | None = None) -> Path | None:
    """A file of hub model `name` already in the cache (no network), e.g. its config.json; None when absent."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name, filename, cache_dir=str(hub_cache_dir(cache_dir)), revision=revision)
    return Path(found) if isinstance(found, str) else None
