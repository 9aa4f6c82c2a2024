"""The base of an adapter, from its own config: ``base_model_name_or_path``.

PEFT (and deltaspec's reference trainer) record the base an adapter was trained on in
``adapter_config.json`` / ``multilora_config.json``. When no base is given, :func:`choose_base`
uses it if it is a local model folder or a Hub id already in the cache (see
:mod:`deltaspec.loaders.sources.hub`; discovery never downloads: ``--base org/name`` does) and says
so; anything else it names (``.``, ``/``, ``~``, ``/dev/zero``, an uncached id) is a note, never an
error. When a base is given, a warning says if it is not the one the adapter names (the shapes are
checked later, module by module, and a mismatch there is an error). ``discover_base=False`` (CLI
``--no-base-discovery``) turns discovery off.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from deltaspec.config_files import parse_json_file
from deltaspec.errors import DeltaspecError, DeltaspecWarning
from deltaspec.loaders.sources import hub

CONFIGS = ("adapter_config.json", "multilora_config.json")
KEY = "base_model_name_or_path"


def named_base(folder: Path) -> tuple[str, Path] | None:
    """(the base the adapter's config names, that config file), or None."""
    candidates = [folder / c for c in CONFIGS]
    if folder.is_dir():
        candidates += sorted(p / CONFIGS[0] for p in folder.iterdir() if p.is_dir())
    for cfg in candidates:
        if not cfg.is_file():
            continue
        try:
            name = parse_json_file(cfg, "an adapter config").get(KEY)
        except (OSError, ValueError, AttributeError):
            return None  # the loader reports a bad config with its own message
        return (name, cfg) if isinstance(name, str) and name.strip() else None
    return None


def note(message: str, kind: str = "note") -> None:
    """Tell the user (a :class:`DeltaspecWarning`; the CLI prints ``deltaspec: note: …``)."""
    warnings.warn(f"{kind}: {message}", DeltaspecWarning, stacklevel=3)


class WouldDownload(DeltaspecError):
    """Kept for callers that catch it: discovery never downloads, so it is no longer raised."""


# The files that make a folder a model checkpoint (torch-free; :mod:`deltaspec.loaders.checkpoint`
# opens them).
MODEL_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                 "pytorch_model.bin.index.json")
SHARDS = ("model-*-of-*.safetensors", "pytorch_model-*-of-*.bin")


def holds_model_weights(folder: Path) -> bool:
    """True when ``folder`` is a folder with HF model weights (single, sharded or pickled)."""
    try:
        return folder.is_dir() and (any((folder / n).is_file() for n in MODEL_WEIGHTS)
                                    or any(next(folder.glob(s), None) for s in SHARDS))
    except (OSError, ValueError):
        return False


def choose_base(folder: Path, base: str | os.PathLike[str] | None, *, discover: bool = True,
                revision: str | None = None, fetch: bool = True) -> Path | None:
    """The base folder to load ``folder`` against: ``base`` (located; a Hub id is downloaded when
    not cached), else the one the adapter names when it is a local model folder or already in
    the Hub cache — discovery never downloads — else None, with a note saying why.

    ``fetch`` is kept for callers that pass it; discovery downloads nothing either way."""
    named = named_base(folder)
    if base is not None:
        path = hub.locate(base, revision, what="base model")
        if named is not None and not same_model(named[0], base, path):
            note(f"base {base} is not the model {named[1].name} names ({named[0]!r}); its shapes "
                 "are checked module by module", "warning")
        return path
    if named is None or not discover:
        return None
    name, cfg = named
    try:
        path = _find(name, cfg)
    except DeltaspecError as exc:
        note(f"base {name!r} named in {cfg} is not used ({str(exc)[:200]}); analysing without a "
             "base (pass --base to give one)")
        return None
    note(f"base: {name} (from {cfg.name} {KEY}; it adds the base-relative columns and reads the "
         "base's weights: --no-base-discovery skips it)")
    return path


def _find(name: str, cfg: Path) -> Path:
    """The named base as a local model folder or a cached Hub snapshot; never downloaded."""
    try:
        local = Path(name).expanduser()
        is_local = local.exists() or local.is_symlink()
    except (OSError, ValueError, RuntimeError):  # too long, a NUL byte, ~unknown-user
        local, is_local = Path(name), False
    if is_local or hub.split_id(name, bare=True) is None:
        if holds_model_weights(local):
            return local
        raise DeltaspecError(f"{name} is not a model folder")
    repo, rev = hub.split_id(name, bare=True) or (name, None)
    cached = hub.cached_folder(repo, rev)
    if cached is None or not hub.readable(cached):
        raise DeltaspecError(f"{name} is not in the Hub cache; discovery does not download: "
                             f"pass --base {name} to download it")
    return cached


def same_model(named: str, given: str | os.PathLike[str], path: Path) -> bool:
    """Whether base ``given`` (located at ``path``) is the model an adapter names as ``named``.

    The same folder, the same Hub id (a hub-cache folder knows its id), or the same final name
    (``org/Llama-2-7b-hf`` and ``/models/Llama-2-7b-hf``), case aside.

    >>> same_model("org/tiny", "/data/Tiny", Path("/data/Tiny"))
    True
    >>> same_model("org/tiny", "/data/other", Path("/data/other"))
    False
    >>> same_model("org/tiny", "other/tiny", Path("/cache/models--other--tiny/snapshots/0"))
    False
    """
    local = Path(named).expanduser()
    if local.exists() and path.exists():
        try:
            return local.resolve() == path.resolve() or local.samefile(path)
        except OSError:
            return False
    named_id = hub.split_id(named, bare=True)
    given_id = _hub_id_of(path) or (hub.split_id(str(given)) or ("", None))[0].lower()
    if named_id is not None and "/" in named_id[0] and "/" in given_id:
        return named_id[0].lower() == given_id  # two Hub ids: the organisation counts
    return _tail(named) in {_tail(str(given)), _tail(str(path)), _tail(given_id)}


def _tail(text: str) -> str:
    parts = hub.split_id(text, bare=True)
    return (parts[0] if parts else text).rstrip("/").rsplit("/", 1)[-1].lower()


def _hub_id_of(path: Path) -> str:
    """``org/name`` of a folder inside a hub cache (``models--org--name/snapshots/<commit>``)."""
    for part in reversed(Path(os.path.abspath(path)).parts):
        if part.startswith("models--"):
            return part.removeprefix("models--").replace("--", "/").lower()
    return ""


__all__ = ["WouldDownload", "choose_base", "named_base", "note", "same_model"]
