"""Teacher weights on the storage root, and the node-local copies the actors load.

A weights directory may be a local path or a URI (`s3://bucket/kdpipe/teachers/…`). Its digest
(sha256 over the weight and config files, names and bytes) is part of every cache fingerprint,
so a directory holds the same digest wherever it lives.

Actors never read a remote directory file by file: `local_copy` fetches it once per node into
a node-local cache keyed by the digest (`$KDPIPE_NODE_CACHE`, default under the system temp
dir), under a file lock, verified against the digest before it is published there, so the
actors of one node share one download and never load a half-written copy.

`publish_dir` writes a directory kdpipe trained to its place on the storage root: locally by one
rename (a crash never leaves a directory that looks finished); remotely file by file with the
`marker` last, so a reader that finds the marker finds every file. Either way a small
`kdpipe_digest.json` records the digest, so later runs need not download a remote copy to know it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs

from kdpipe import storage

log = logging.getLogger("kdpipe.weights")

WEIGHT_PATTERNS = ("*.safetensors", "*.json", "*.bin", "*.pt")
DIGEST_FILE = "kdpipe_digest.json"
NODE_CACHE_ENV = "KDPIPE_NODE_CACHE"


def node_cache() -> Path:
    """This node's cache of fetched weights (kept across runs: a retrain cycle finds them there)."""
    root = os.environ.get(NODE_CACHE_ENV) or os.path.join(tempfile.gettempdir(), f"kdpipe-{os.getuid()}", "weights")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def digest_local(path: Path, patterns: tuple[str, ...] = WEIGHT_PATTERNS) -> str:
    """sha256 over the weight/config files of a local directory (relative names + bytes, sorted);
    kdpipe's own digest record is left out, so publishing does not change the digest."""
    if not path.exists():
        raise FileNotFoundError(f"teacher weights '{path}' do not exist")
    files = sorted({f for pat in patterns for f in path.rglob(pat) if f.is_file() and f.name != DIGEST_FILE})
    if not files:
        raise FileNotFoundError(f"teacher directory '{path}' holds no weight files ({', '.join(patterns)})")
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()[:16]


def digest(loc: str, patterns: tuple[str, ...] = WEIGHT_PATTERNS) -> str:
    """The digest of a weights directory at a path or URI: a remote directory kdpipe published
    records it; any other remote directory is fetched to this node once (`local_copy`) and hashed."""
    if not storage.is_remote(loc):
        return digest_local(Path(storage.local(loc)), patterns)
    try:
        recorded = json.loads(storage.read_text(storage.join(loc, DIGEST_FILE)))
        if recorded.get("patterns") == list(patterns):
            return str(recorded["digest"])
    except (FileNotFoundError, OSError, ValueError, KeyError):
        pass
    return digest_local(local_copy(loc, patterns=patterns), patterns)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _listing_key(loc: str) -> str:
    """What identifies a remote directory's content without reading it: names, sizes, mtimes."""
    fs, path = storage.resolve(loc)
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    files = sorted((f.path[len(path) :], f.size, f.mtime_ns) for f in found if f.type == pafs.FileType.File)
    if not files:
        raise FileNotFoundError(f"teacher weights '{loc}' do not exist (no files under it)")
    return "listing-" + hashlib.sha256(json.dumps([loc, files], default=str).encode()).hexdigest()[:16]


def local_copy(loc: str, want: str | None = None, patterns: tuple[str, ...] = WEIGHT_PATTERNS) -> Path:
    """A local directory holding the weights at `loc`: `loc` itself when local; else this node's
    copy, fetched once per node (keyed by the digest `want` when given, verified against it)."""
    if not storage.is_remote(loc):
        return Path(storage.local(loc))
    cache = node_cache()
    if want is not None and (cache / want / ".complete").exists():
        return cache / want
    alias = cache / _listing_key(loc)
    with _locked(cache / ".fetch.lock"):
        if want is not None and (cache / want / ".complete").exists():
            return cache / want
        if want is None and alias.is_file():
            known = cache / alias.read_text().strip()
            if (known / ".complete").exists():
                return known
        tmp = cache / f".fetch-{uuid.uuid4().hex[:12]}"
        try:
            fs, path = storage.resolve(loc)
            tmp.mkdir(parents=True)
            pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            got = digest_local(tmp, patterns)
            if want is not None and got != want:
                raise storage.StorageError(
                    f"teacher weights at {loc} have digest {got}, not the {want} this run's "
                    "caches were made with: they changed during the run; rerun"
                )
            (tmp / ".complete").write_text(loc)
            dest = cache / got
            if dest.exists():
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        alias.write_text(got)
        size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
        log.info("fetched teacher weights %s to this node's cache %s (%.1f MB)", loc, dest, size / 2**20)
        return dest


def exists(loc: str, marker: str) -> bool:
    """Whether a directory published with `marker` is complete at `loc`."""
    return storage.exists(storage.join(loc, marker))


def publish_dir(local_dir: Path, loc: str, marker: str, patterns: tuple[str, ...] = WEIGHT_PATTERNS) -> bool:
    """Move a directory kdpipe trained into place at `loc` (see the module docstring); `marker`
    (a file of `local_dir`) is what readers look for. False when another process published
    the same directory first (the same digest: theirs is used)."""
    if not (local_dir / marker).is_file():
        raise ValueError(f"{local_dir} has no {marker}: nothing to publish")
    (local_dir / DIGEST_FILE).write_text(
        json.dumps({"digest": digest_local(local_dir, patterns), "patterns": list(patterns)})
    )
    if not storage.is_remote(loc):
        dest = Path(storage.local(loc))
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        shutil.copytree(local_dir, tmp)
        try:
            if dest.exists() and not any(dest.iterdir()):  # an empty directory made by the caller
                dest.rmdir()
            os.replace(tmp, dest)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if (dest / marker).exists():
                return False
            raise
        return True
    if exists(loc, marker):
        return False
    files = sorted(f for f in local_dir.rglob("*") if f.is_file() and f.name != marker)
    for f in [*files, local_dir / marker]:  # the marker last: whoever sees it sees every file
        storage.upload_copy(f, storage.join(loc, str(f.relative_to(local_dir))))
    return True
