"""Where kdpipe keeps files: a local path, or a URI that pyarrow's filesystems resolve
(`s3://`, `gs://`, `hdfs://`, …), so the nodes of a cluster share sources and caches without a
shared disk.

Locations are plain strings everywhere (what Ray Data's readers and writers take as they are).
Credentials and endpoints come from each filesystem's own environment — `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL` (MinIO and other S3-compatible stores), `AWS_REGION`
for S3 — which Ray Data, Ray Train and pyarrow all read, on every node. `file://` URIs are local
paths.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.fs as pafs

from kdpipe.errors import KdpipeError, StorageError

__all__ = ["KdpipeError", "StorageError", "Layout"]


def is_remote(loc: str | os.PathLike[str]) -> bool:
    """A URI of a filesystem other than the local one."""
    s = str(loc)
    return "://" in s and not s.startswith("file://")


def local(loc: str | os.PathLike[str]) -> str:
    """A local location as a plain absolute path (`file://` stripped)."""
    s = str(loc)
    return os.path.abspath(s[len("file://") :] if s.startswith("file://") else s)


def normalize(loc: str | os.PathLike[str]) -> str:
    """Remote URIs as given (without a trailing slash); local paths absolute, so Ray workers that
    run elsewhere find them."""
    return str(loc).rstrip("/") if is_remote(loc) else local(loc)


def resolve(loc: str) -> tuple[pafs.FileSystem, str]:
    if not is_remote(loc):
        return pafs.LocalFileSystem(), local(loc)
    try:
        return pafs.FileSystem.from_uri(loc)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, ValueError) as e:
        raise KdpipeError(
            f"cannot open '{loc}' ({e}); check the URI and the filesystem's credentials "
            "(for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_REGION)"
        ) from None


def join(loc: str | os.PathLike[str], *parts: str) -> str:
    if is_remote(loc):
        return "/".join([str(loc).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(local(loc), *parts))


def parent(loc: str | os.PathLike[str]) -> str:
    if is_remote(loc):
        head, _, _ = str(loc).rstrip("/").rpartition("/")
        return head
    return str(Path(local(loc)).parent)


def name(loc: str) -> str:
    return str(loc).rstrip("/").rpartition("/")[2]


def _child(base_loc: str, base_path: str, path: str) -> str:
    """The location of `path` (a filesystem path found under `base_path`) in `base_loc`'s form."""
    return base_loc.rstrip("/") + "/" + path[len(base_path) :].lstrip("/")


def info(loc: str) -> pafs.FileInfo:
    fs, path = resolve(loc)
    return fs.get_file_info(path)


def exists(loc: str) -> bool:
    return info(loc).type != pafs.FileType.NotFound


def is_dir(loc: str) -> bool:
    return info(loc).type == pafs.FileType.Directory


def files_under(loc: str, suffixes: tuple[str, ...]) -> list[str]:
    """Files below a directory (recursively), a single file, or a glob's matches (`*` in the last
    part), sorted; each as a location in the form `loc` was given."""
    fs, path = resolve(loc)
    if not is_remote(loc):
        import glob

        p = Path(path)
        if p.is_dir():
            return sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix in suffixes)
        return sorted(glob.glob(path))
    if any(c in name(loc) for c in "*?["):
        base, pattern = parent(loc), name(loc)
        bfs, bpath = resolve(base)
        found = bfs.get_file_info(pafs.FileSelector(bpath, allow_not_found=True))
        return sorted(
            _child(base, bpath, f.path)
            for f in found
            if f.type == pafs.FileType.File and fnmatch.fnmatch(f.base_name, pattern)
        )
    fi = fs.get_file_info(path)
    if fi.type == pafs.FileType.File:
        return [loc]
    if fi.type != pafs.FileType.Directory:
        return []
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted(
        _child(loc, path, f.path)
        for f in found
        if f.type == pafs.FileType.File and os.path.splitext(f.base_name)[1] in suffixes
    )


def stamp(loc: str) -> list[int]:
    """Size and modification time (what a later read compares to catch a file changed underneath)."""
    fi = info(loc)
    if fi.type == pafs.FileType.NotFound:
        raise FileNotFoundError(loc)
    return [int(fi.size or 0), int(fi.mtime_ns or 0)]


def size(loc: str) -> int:
    return int(info(loc).size or 0)


def open_input(loc: str) -> Any:
    """A seekable file (Parquet footers, row groups)."""
    fs, path = resolve(loc)
    return fs.open_input_file(path)


def parquet_metadata(loc: str) -> Any:
    """A Parquet file's footer (rows, row groups, schema), the file closed again."""
    import pyarrow.parquet as pq

    with open_input(loc) as fh:
        return pq.ParquetFile(fh).metadata


def open_binary(loc: str) -> IO[bytes]:
    """A forward-only binary stream (lines, CSV, checksums)."""
    if not is_remote(loc):
        return open(local(loc), "rb")
    fs, path = resolve(loc)
    return fs.open_input_stream(path)


def read_text(loc: str) -> str:
    with open_binary(loc) as fh:
        return fh.read().decode()


def write_text(loc: str, text: str) -> None:
    """Remote: one object written whole, so a reader sees the old object or the new one, never a part
    (S3 and GCS publish an object only when its upload completes). Local writers that need atomic
    replacement (the cache manifest) write a temporary file and rename it themselves."""
    fs, path = resolve(loc)
    if not is_remote(loc):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    with fs.open_output_stream(path) as fh:
        fh.write(text.encode())


def sha256(loc: str) -> str:
    h = hashlib.sha256()
    with open_binary(loc) as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def upload(local_path: str | os.PathLike[str], loc: str) -> None:
    """Copy a local file to `loc` (a rename where `loc` is local too)."""
    if not is_remote(loc):
        Path(local(loc)).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(local_path), local(loc))
        return
    fs, path = resolve(loc)
    pafs.copy_files(str(local_path), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def upload_copy(local_path: str | os.PathLike[str], loc: str) -> None:
    """Copy a local file to `loc` (the local file stays)."""
    if not is_remote(loc):
        Path(local(loc)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(str(local_path), local(loc))
        return
    fs, path = resolve(loc)
    pafs.copy_files(str(local_path), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def delete_file(loc: str) -> None:
    """Remove one file; a missing one is fine."""
    fs, path = resolve(loc)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def delete_dir(loc: str) -> None:
    """Remove a directory and what it holds; a missing one is fine."""
    fs, path = resolve(loc)
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass


def display(loc: str | os.PathLike[str]) -> str:
    """A location as a user reads it (and as MLflow records a dataset's source)."""
    return str(loc) if is_remote(loc) else local(loc)


class Layout:
    """Where each kind of artefact lives under the storage root (a path or a URI)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = normalize(root)

    @property
    def cache(self) -> str:
        """Teacher-output caches: `<cache>/<teacher>/<fingerprint>/`."""
        return join(self.root, "cache")

    @property
    def teachers(self) -> str:
        """Teachers kdpipe trains itself, by kind and digest."""
        return join(self.root, "teachers")

    @property
    def ray_results(self) -> str:
        """Ray Train's `storage_path`: run folders and checkpoints."""
        return join(self.root, "ray_results")

    @property
    def index(self) -> str:
        return join(self.root, "index")

    @property
    def quarantine(self) -> str:
        return join(self.root, "quarantine")

    def __repr__(self) -> str:
        return f"Layout({self.root!r})"
