"""A genuine Hugging Face hub cache, laid out the way huggingface_hub writes it.

``models--<org>--<name>/blobs/<sha256>`` hold the files, ``snapshots/<commit>/<path>`` are
relative symlinks ``../../blobs/<sha256>`` (deeper for files in sub-folders), ``refs/main`` holds
the commit hash.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def add_repo(cache: Path, repo: str, folder: Path, revision: str = "main",
             commit: str | None = None) -> Path:
    """Put every file of ``folder`` into ``cache`` as Hub repo ``repo``; the snapshot folder."""
    storage = cache / ("models--" + repo.replace("/", "--"))
    commit = commit or hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()
    snap = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    for src in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = src.relative_to(folder)
        sha = hashlib.sha256(src.read_bytes()).hexdigest()
        blob = storage / "blobs" / sha
        if not blob.exists():
            shutil.copyfile(src, blob)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(os.path.relpath(blob, link.parent)))
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / revision).write_text(commit)
    return snap


def offline_env(monkeypatch, cache: Path) -> None:
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE=cache, for this process and its subprocesses.

    huggingface_hub reads both at import into ``huggingface_hub.constants``: set those too.
    """
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
