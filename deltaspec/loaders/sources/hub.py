"""Where a checkpoint lives: a folder, a weights file, or a Hugging Face Hub id (``org/name[@rev]``).

:func:`locate` turns what the user typed into a local folder. An argument that is an existing
path is that path. One that is not, and looks like a Hub id (``org/name``, ``org/name@revision``),
is resolved by ``huggingface_hub`` — its own functions, so that ``HF_HOME``, ``HF_HUB_CACHE``,
``HF_HUB_OFFLINE`` and ``HF_TOKEN`` apply exactly as for transformers:

1. the local cache first (``snapshot_download(local_files_only=True)``): a cached snapshot that
   holds a checkpoint deltaspec can read is used as is, without touching the network;
2. else, unless offline, only what deltaspec reads is downloaded (with huggingface_hub's progress
   bar): the configs and indexes first, then the weight files they need — safetensors shards of the
   index, never ``.bin`` when safetensors exist, never ``consolidated.*`` duplicates;
3. offline and not cached: one line naming the id and the command that fetches it.

The hub cache is a tree of symlinks (``snapshots/<commit>/f → ../../blobs/<sha>``): the folder
returned is the snapshot folder, and files are named through it.
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

from deltaspec.config_files import parse_json_file
from deltaspec.errors import CheckpointError, UsageError

# org/name, as the Hub allows them (letters, digits, - _ .), with an optional @revision.
_HUB_ID = re.compile(r"^(?P<repo>(?P<org>[A-Za-z0-9][\w.\-]*/)?[A-Za-z0-9][\w.\-]*)"
                     r"(?:@(?P<rev>[\w.\-/]+))?$")
CONFIG_PATTERNS = ("*config.json", "*.index.json")  # small files every format is described by
SKIP_CONFIGS = ("tokenizer_config.json",)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json",
           "adapter_model.safetensors.index.json")
SKIP_WEIGHTS = ("consolidated*", "original/*", "onnx/*", "*.onnx*", "training_args.bin",
                "optimizer.pt", "scheduler.pt", "rng_state*.pth", "*/optimizer.pt")


_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_REF_PART = re.compile(r"^[A-Za-z0-9_][\w.\-]*$")
MAX_REVISION = 256
MAX_CACHE_FILES = 10_000  # files of one cached snapshot checked for containment


def valid_revision(rev: str) -> bool:
    """Whether ``rev`` is a commit hash or a branch/tag name as git allows it (the rules
    ``git check-ref-format`` applies, narrowed to what the Hub uses): never ``..``, an absolute
    path, a backslash, an empty or dot-led component, nor ``.lock`` — decided before any path
    is built from it.

    >>> valid_revision("main"), valid_revision("v1.0/rc-2"), valid_revision("a" * 40)
    (True, True, True)
    >>> valid_revision("../../x"), valid_revision("/etc"), valid_revision("a//b"), valid_revision(".x")
    (False, False, False, False)
    """
    if not isinstance(rev, str) or not 0 < len(rev) <= MAX_REVISION or _COMMIT.match(rev):
        return isinstance(rev, str) and bool(_COMMIT.match(rev))
    return ".." not in rev and "@{" not in rev and not rev.endswith((".lock", "/", ".")) \
        and all(_REF_PART.match(part) for part in rev.split("/"))


def check_revision(rev: str | None, label: str) -> None:
    """A one-line :class:`UsageError` unless ``rev`` is None or :func:`valid_revision`."""
    if rev is not None and not valid_revision(rev):
        raise UsageError(f"{label}: revision {str(rev)[:80]!r} is not a branch, tag or commit name")


def split_id(text: str, *, bare: bool = False) -> tuple[str, str | None] | None:
    """(repo id, revision) when ``text`` looks like a Hub id, else None.

    ``bare`` also accepts ids without an organisation (``gpt2``), as adapter configs name them.

    >>> split_id("meta-llama/Llama-2-7b-hf@main")
    ('meta-llama/Llama-2-7b-hf', 'main')
    >>> split_id("./adapter") is None, split_id("gpt2") is None, split_id("gpt2", bare=True)
    (True, True, ('gpt2', None))
    """
    m = _HUB_ID.match(text)
    if m is None or ".." in m["repo"] or "--" in m["repo"] or (m["org"] is None and not bare):
        return None
    if len(m["repo"]) > 96 or (m["rev"] is not None and not valid_revision(m["rev"])):
        return None
    return m["repo"], m["rev"]


def is_hub_id(text: str | os.PathLike[str], *, bare: bool = False) -> bool:
    """True when ``text`` is not an existing path and looks like a Hub id."""
    return isinstance(text, str) and not Path(text).exists() and split_id(text, bare=bare) is not None


def locate(path: str | os.PathLike[str], revision: str | None = None, *, bare: bool = False,
           what: str = "checkpoint") -> Path:
    """The local folder (or file) for ``path``: the path itself, or a resolved Hub id.

    Args:
        path: a folder, a file, or ``org/name[@revision]``.
        revision: the revision of a Hub id given without ``@revision`` (branch, tag or commit).
        bare: also accept ids without an organisation (see :func:`split_id`).
        what: what the id is, for messages (``checkpoint``, ``base model``).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise UsageError(f"{what}: expected a path, a Hub id, a PeftModel, an nn.Module or a state "
                         f"dict, not {type(path).__name__}")
    from deltaspec.loaders.store import exists  # too long, NUL: one line naming the path

    p = Path(path)
    if exists(p) or not isinstance(path, str):
        return p
    m = _HUB_ID.match(path)
    if m is not None and m["rev"] is not None and not exists(Path(path.split("@")[0])):
        check_revision(m["rev"], path)
    parts = split_id(path, bare=bare)
    if parts is None:
        raise CheckpointError(f"{p}: no such file or directory")
    repo, rev = parts
    if _local_looking(path):  # demo-report/lora with demo-report/ here: a mistyped path
        cached = cached_folder(repo, rev or revision)
        if cached is not None and readable(cached):
            return cached
        raise CheckpointError(f"{p}: no such file or directory (nor a Hub id in the cache)")
    return hub_folder(repo, rev or revision, what=what)


def _local_looking(path: str) -> bool:
    """A path whose first component is a local folder (``demo-report/lora`` with
    ``demo-report/`` here): a mistyped path, not a Hub id."""
    first = Path(path).parts[0] if Path(path).parts else ""
    try:
        return bool(first) and os.path.isdir(first)
    except (OSError, ValueError):
        return False


def _hub() -> Any:
    import huggingface_hub
    import huggingface_hub.errors  # noqa: F401 (a submodule: not loaded by the package itself)

    return huggingface_hub


def offline() -> bool:
    """True when huggingface_hub is in offline mode (``HF_HUB_OFFLINE``)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
_REACHABLE: dict[str, bool] = {}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub endpoint (``HF_ENDPOINT``) accepts a connection within ``timeout`` s,
    asked once per process: without it, huggingface_hub retries a dead network for ~25 s with
    its own messages on stderr. Behind a proxy the check is left to the download itself."""
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if any(os.environ.get(v) for v in PROXY_VARS):
        return True
    url = urlsplit(constants.ENDPOINT)
    host, port = url.hostname or "", url.port or (80 if url.scheme == "http" else 443)
    key = f"{host}:{port}"
    if key not in _REACHABLE:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                _REACHABLE[key] = True
        except OSError:
            _REACHABLE[key] = False
    return _REACHABLE[key]


def cached_folder(repo: str, revision: str | None = None) -> Path | None:
    """The cached snapshot folder of ``repo`` at ``revision`` (default ``main``), or None.

    A repo with no folder in the cache (``models--org--name``) is answered without importing
    huggingface_hub's download machinery (≈ 0.5 s of imports, most of a small CLI run)."""
    from huggingface_hub import constants

    check_revision(revision, repo)
    sep = constants.REPO_ID_SEPARATOR
    repo_dir = Path(constants.HF_HUB_CACHE) / f"models{sep}{repo.replace('/', sep)}"
    if not os.path.isdir(repo_dir):
        return None
    hf = _hub()
    incomplete = getattr(hf.errors, "IncompleteSnapshotError", OSError)  # huggingface_hub ≥ 1.0
    try:
        folder = hf.snapshot_download(repo, revision=revision, local_files_only=True)
    except (hf.errors.LocalEntryNotFoundError, incomplete, OSError, ValueError):
        return None
    return contained(Path(folder), repo_dir)


def contained(folder: Path, repo_dir: Path) -> Path:
    """``folder`` (a cached snapshot) when it and every file in it lie inside the repo's cache
    folder ``repo_dir`` — files resolving into its ``blobs/`` (the cache's own symlinks) or
    plain files of the snapshot — else a one-line :class:`CheckpointError` naming the file."""
    root = Path(os.path.realpath(repo_dir))
    blobs, snap = root / "blobs", Path(os.path.realpath(folder))
    if not snap.is_relative_to(root / "snapshots"):
        raise CheckpointError(f"{folder}: the cached snapshot lies outside {repo_dir}")
    for i, (where, _, files) in enumerate(os.walk(folder)):
        for name in files:
            f = Path(where) / name
            real = Path(os.path.realpath(f))
            if not (real.is_relative_to(blobs) or (not f.is_symlink() and real.is_relative_to(snap))):
                raise CheckpointError(f"{f}: resolves outside the Hub cache of this repo "
                                      f"({real}); refusing to read it")
        if i > MAX_CACHE_FILES:
            raise CheckpointError(f"{folder}: more than {MAX_CACHE_FILES} folders in a cached snapshot")
    return folder


def readable(folder: Path) -> bool:
    """True when a cached snapshot holds what deltaspec reads: weight files (here or one folder
    down), and every shard its indexes name. Whether their format is one deltaspec knows is the
    loaders' to say, with their own message."""
    weights = [p for pattern in ("*", "*/*") for p in folder.glob(pattern)
               if p.name.endswith(WEIGHT_SUFFIXES) and p.is_file()]
    indexes = [p for pattern in ("*", "*/*") for p in folder.glob(pattern) if p.name in INDEXES]
    return bool(weights) and all(_shards_present(i) for i in indexes)


def _shards_present(index: Path) -> bool:
    try:
        shards = set(parse_json_file(index, "a valid index file")["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return True  # the loader reports a bad index with its own message
    return all((index.parent / str(s)).is_file() for s in shards)


def hub_folder(repo: str, revision: str | None = None, *, what: str = "checkpoint") -> Path:
    """The local snapshot folder of Hub repo ``repo``: from the cache, else downloaded."""
    label = repo + (f"@{revision}" if revision else "")
    check_revision(revision, label)
    cached = cached_folder(repo, revision)
    if cached is not None and readable(cached):
        return cached
    if offline():
        state = "cached without the files deltaspec reads" if cached is not None else "not cached"
        raise CheckpointError(
            f"{label}: {what} is {state} ({_cache_dir()}) and the Hub is offline "
            f"(HF_HUB_OFFLINE=1); fetch it online with: {fetch_command(repo, revision)}")
    if not hub_reachable():
        from huggingface_hub import constants

        raise CheckpointError(
            f"{label}: {what} is not cached ({_cache_dir()}) and the Hub ({constants.ENDPOINT}) "
            f"cannot be reached; fetch it where it can with: {fetch_command(repo, revision)}")
    return _download(repo, revision, label, what)


def _cache_dir() -> str:
    from huggingface_hub import constants

    return f"HF_HUB_CACHE={constants.HF_HUB_CACHE}"


def fetch_command(repo: str, revision: str | None = None) -> str:
    """The shell command that downloads what deltaspec reads of ``repo``."""
    rev = f" --revision {revision}" if revision else ""
    return f"hf download {repo}{rev} --include '*.json' '*.safetensors'"


def _download(repo: str, revision: str | None, label: str, what: str) -> Path:
    hf = _hub()
    try:
        files = hf.HfApi().list_repo_files(repo, revision=revision)
        configs = [f for f in files if _is_config(f)]
        folder = Path(hf.snapshot_download(repo, revision=revision, allow_patterns=configs or None)) \
            if configs else None
        wanted = configs + weight_files(files, folder)
        if not any(f.endswith(WEIGHT_SUFFIXES) for f in wanted):
            raise CheckpointError(f"{label}: the Hub repo holds no weights deltaspec reads "
                                  f"(files: {', '.join(files[:6])})")
        return Path(hf.snapshot_download(repo, revision=revision, allow_patterns=wanted))
    except CheckpointError:
        raise
    except hf.errors.RevisionNotFoundError:
        raise CheckpointError(f"{label}: no revision {revision!r} of this {what} on the Hub") from None
    except hf.errors.GatedRepoError:
        raise CheckpointError(f"{label}: a gated repo; accept its terms on the Hub and set HF_TOKEN "
                              "(or run `hf auth login`)") from None
    except hf.errors.RepositoryNotFoundError:
        raise CheckpointError(f"{label}: no such {what} on the Hugging Face Hub (a private one needs "
                              "HF_TOKEN), and no such local path") from None
    except Exception as exc:  # noqa: BLE001 (network, HTTP and disk errors of many types)
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise CheckpointError(f"{label}: cannot download this {what} from the Hub ({why}); fetch it "
                              f"with: {fetch_command(repo, revision)}") from None


def _is_config(name: str) -> bool:
    base = PurePosixPath(name).name
    return any(fnmatch.fnmatch(base, p) for p in CONFIG_PATTERNS) and base not in SKIP_CONFIGS


def weight_files(files: list[str], folder: Path | None) -> list[str]:
    """The weight files of a repo listing that deltaspec reads (``folder``: the configs fetched).

    Per folder of the repo: the shards an index names, else its safetensors files, else its
    ``.bin``/``.pt`` files — never ``.bin`` where safetensors are.

    >>> weight_files(["model.safetensors", "pytorch_model.bin", "consolidated.safetensors"], None)
    ['model.safetensors']
    >>> weight_files(["a/adapter_model.bin", "README.md"], None)
    ['a/adapter_model.bin']
    """
    weights = [f for f in files if f.endswith(WEIGHT_SUFFIXES)
               and not any(fnmatch.fnmatch(f, p) for p in SKIP_WEIGHTS)]
    by_dir: dict[str, list[str]] = {}
    for f in weights:
        by_dir.setdefault(str(PurePosixPath(f).parent), []).append(f)
    out: list[str] = []
    for d, group in by_dir.items():
        st = [f for f in group if f.endswith(".safetensors")]
        chosen = st or group
        names = INDEXES[0::2] if st else INDEXES[1:2]
        index = next((f"{d}/{n}".removeprefix("./") for n in names
                      if f"{d}/{n}".removeprefix("./") in files), None)
        shards = _index_shards(folder / index) if folder is not None and index else None
        if shards is not None:
            chosen = [f for f in chosen if PurePosixPath(f).name in shards]
        out.extend(chosen)
    return out


def _index_shards(index: Path) -> set[str] | None:
    try:
        return {str(s) for s in parse_json_file(index, "a valid index file")["weight_map"].values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


__all__ = ["cached_folder", "fetch_command", "hub_folder", "is_hub_id", "locate", "offline",
           "readable", "split_id", "weight_files"]
