"""The teacher-output cache: versioned Parquet parts + a manifest written last.

Layout: ``<storage>/cache/<teacher_id>/<fingerprint>/``
  ``parts/<part>/*.parquet``  one part per teach run that added rows (incremental cache)
  ``parts/<part>/PART.json``  the part's own manifest: its files' sha256, its rows and the tally of its ids
  ``MANIFEST.json``           teacher id, weights digest, output spec, schema, parts + checksums
  ``.staging/``               where a running teach stage writes (one dir + lock per run); never read

A cache (or a part) exists only once the manifest names it; the manifest is replaced
atomically (write + fsync + rename), so an interrupted run leaves nothing that looks complete.
Every file is checked against its sha256 before a stage reads it (`files(verify=True)`, once per
cache object); a damaged part is reported with the fix (`kdpipe cache repair`), and a cache whose
MANIFEST.json is lost is rebuilt from its verified parts' own manifests (`rebuild_manifest`), never
taught again silently.

A cache may also live at a URI that pyarrow's filesystems resolve (`storage: s3://…`,
see `kdpipe.storage`). Object stores have neither rename nor file locks, so there a running teach
stage writes its part straight into ``parts/<unique name>/`` — unread until the manifest names
it — and the manifest is one object written whole. Runs are not serialised there: of two teach
runs that add to one remote cache at the same moment, the manifest written last wins and the
other run's rows are taught again by the next run (never held twice).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kdpipe import storage
from kdpipe.errors import CacheCorruptError

MANIFEST = "MANIFEST.json"
PART_MANIFEST = "PART.json"
FORMAT_VERSION = 1


def fingerprint(identity: dict[str, Any]) -> str:
    """Stable hash of everything that determines a teacher's outputs for a given row id."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def cache_at(root: str | os.PathLike[str], *parts: str) -> TeacherCache:
    """The cache below a cache root (`<storage>/cache`, a path or a URI)."""
    return TeacherCache(storage.join(root, *parts) if storage.is_remote(root) else Path(storage.local(root), *parts))


@dataclass
class TeacherCache:
    dir: Path | str  # a local directory, or a URI (`s3://bucket/cache/<teacher>/<fingerprint>`)
    _committed: set[str] = field(default_factory=set, repr=False, compare=False)
    _verified: dict[str, tuple[str, Any]] = field(
        default_factory=dict, repr=False, compare=False
    )  # file -> (sha256, stamp) checked

    @property
    def remote(self) -> bool:
        return storage.is_remote(self.dir)

    def location(self, rel: str) -> Any:
        """A file of the cache by its manifest path (a Path locally, a URI string remotely)."""
        return storage.join(self.dir, rel) if self.remote else Path(self.dir) / rel

    @property
    def manifest_path(self) -> Any:
        return self.location(MANIFEST)

    def manifest(self) -> dict[str, Any] | None:
        if self.remote:  # one request: absent is an answer, not an error
            try:
                return json.loads(storage.read_text(self.manifest_path))
            except FileNotFoundError:
                return None
        if not self.manifest_path.exists():
            return None
        return json.loads(self.manifest_path.read_text())

    def is_complete(self) -> bool:
        return self.manifest() is not None

    def files(self, verify: bool = True) -> list[Any]:
        """Parquet files named by the manifest, each checked against its sha256 when `verify` (a local
        file once per cache object while its size and mtime stay the same: a run's teach and distil
        stages do not hash the same files twice)."""
        m = self.manifest()
        if m is None:
            raise CacheCorruptError(
                f"cache {self.dir} has no {MANIFEST}: it is incomplete; run `kdpipe cache repair SPEC` "
                "(rebuilds it from its verified parts) or `kdpipe teach SPEC`"
            )
        out = []
        for part in m["parts"]:
            for f in part["files"]:
                p = self.location(f["path"])
                try:
                    stamp = storage.stamp(str(p))
                except FileNotFoundError:
                    stamp = None
                why = "is missing" if stamp is None else None
                if why is None and verify and self._verified.get(str(p)) != (f["sha256"], stamp):
                    why = self.check_file(str(p), f["sha256"])
                if why:
                    raise CacheCorruptError(
                        f"cache file {p} {why} (part {part['name']} of {self.dir}); run "
                        "`kdpipe cache repair SPEC`: it drops the damaged part and teaches its "
                        "rows again"
                    )
                if verify and not self.remote:  # object stores' mtimes are too coarse to tell a rewrite apart
                    self._verified[str(p)] = (f["sha256"], stamp)
                out.append(p)
        return out

    def check_file(self, loc: str, sha: str) -> str | None:
        """Why a file fails its checksum, or None when it matches."""
        try:
            got = storage.sha256(loc)
        except FileNotFoundError:
            return "is missing"
        return None if got == sha else "does not match its checksum (corrupt or truncated)"

    def check_usable(self, verify: bool = True) -> None:
        """Before a stage adds to or reads this cache: a manifest that was lost is reported (its
        parts are still there: teaching their rows again would be silent waste), and with `verify`
        every file is checked against its checksum."""
        if self.manifest() is None:
            lost = self.part_dirs()
            if lost:
                raise CacheCorruptError(
                    f"cache {self.dir} holds {len(lost)} part(s) but no {MANIFEST} (lost or deleted): "
                    "run `kdpipe cache repair SPEC` to rebuild it from its verified parts"
                )
            return
        if verify:
            self.files(verify=True)

    def orphan_parts(self) -> list[str]:
        """Part directories on disk (or in the bucket) that the manifest does not name."""
        named = {p["name"] for p in (self.manifest() or {}).get("parts", [])}
        return sorted(n for n in self.part_dirs() if n not in named)

    def part_dirs(self) -> list[str]:
        """Names of the part directories under parts/ that hold any file (published or not)."""
        root = str(self.location("parts"))
        if not storage.exists(root):
            return []
        found = storage.files_under(root, (".json", ".parquet"))
        return sorted({storage.name(storage.parent(f)) for f in found})

    def part_manifest(self, name: str) -> dict[str, Any] | None:
        try:
            return json.loads(storage.read_text(str(self.location(f"parts/{name}/{PART_MANIFEST}"))))
        except (FileNotFoundError, OSError, ValueError):
            return None

    def read(self, columns: list[str] | None = None, verify: bool = True) -> pa.Table:
        files = self.files(verify=verify)
        m = self.manifest() or {}
        schema = (
            pa.schema([pa.field(n, _type_from_str(t)) for n, t in m.get("schema", {}).items()])
            if m.get("schema")
            else None
        )
        tables = []
        for f in files:
            try:
                with storage.open_input(str(f)) as fh:
                    tables.append(pq.read_table(fh, columns=columns))
            except (pa.ArrowInvalid, OSError) as e:
                raise CacheCorruptError(
                    f"cache file {f} cannot be read ({e}); delete {self.dir} and rerun `kdpipe teach`"
                ) from None
        if not tables:
            return schema.empty_table() if schema is not None else pa.table({"id": pa.array([], pa.string())})
        return pa.concat_tables(tables)

    def ids(self) -> set[str]:
        return set(self.id_array().to_pylist())

    def id_array(self) -> pa.Array:
        """The cached ids as one Arrow array, in memory: for tests and small tools; the stages find
        what a cache lacks inside Ray Data (`kdpipe.todo`)."""
        if not self.is_complete():
            return pa.array([], pa.string())
        return self.read(columns=["id"], verify=False)["id"].combine_chunks()

    @contextlib.contextmanager
    def staging(self) -> Iterator[Any]:
        """Where this run writes its part, owned by the run for as long as the context is open.

        Locally: a fresh dir under ``.staging``, owned through an flock on ``.staging/<name>.lock``,
        taken before the dir exists and held until it is committed or removed. Clean-up removes only
        the staging dirs whose lock no live process holds (a crashed run's), never one that a
        concurrent run is still writing. The dir is gone on exit unless `commit` moved it into parts/.
        Remotely: ``parts/<unique name>`` (see the module docstring), removed on exit unless committed.
        """
        name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        if self.remote:
            path = self.location(f"parts/{_part_name()}-{name}")
            try:
                yield path
            finally:
                if path not in self._committed:
                    storage.delete_dir(path)
            return
        root = Path(self.dir) / ".staging"
        root.mkdir(parents=True, exist_ok=True)
        self._remove_orphans(root)
        lock_path, path = root / f"{name}.lock", root / name
        fh = open(lock_path, "w")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
            path.mkdir()
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
            lock_path.unlink(missing_ok=True)
            fh.close()

    @staticmethod
    def _remove_orphans(root: Path) -> None:
        """Staging dirs of crashed runs: no lock file, or a lock file nobody holds."""
        for entry in root.iterdir():
            if entry.suffix == ".lock" or not entry.is_dir():
                continue
            lock_path = root / f"{entry.name}.lock"
            try:
                fh = open(lock_path, "r+")
            except FileNotFoundError:  # an owner creates its lock before its dir: no lock, no owner
                shutil.rmtree(entry, ignore_errors=True)
                continue
            with fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live run owns it
                shutil.rmtree(entry, ignore_errors=True)
                lock_path.unlink(missing_ok=True)

    def commit(
        self, staging: Any, header: dict[str, Any], source_fingerprint: str, ids: dict[str, int] | None = None
    ) -> dict[str, Any]:
        """Publish a staged part in the manifest (locally: moved into parts/ first; manifest last).
        The part gets its own manifest (files, rows, the tally `ids` of its ids) before the
        cache's manifest names it, so a lost MANIFEST.json can be rebuilt from the parts."""
        files = staged_files(staging)
        m = self.manifest() or {**header, "format": FORMAT_VERSION, "parts": [], "created": _now()}
        if self.remote:  # already in parts/: the manifest is what publishes it
            name = storage.name(str(staging))
        else:
            name = f"{len(m['parts']) + 1:04d}-{uuid.uuid4().hex[:8]}"
            for f in files:
                _fsync(Path(f))  # the bytes are on disk before any manifest names them
        entries = []
        rows = 0
        schema = None
        for f in files:
            meta = storage.parquet_metadata(f)
            rows += meta.num_rows
            schema = schema or meta.schema.to_arrow_schema()
            entries.append(
                {"path": f"parts/{name}/{storage.name(f)}", "sha256": storage.sha256(f), "rows": meta.num_rows}
            )
        part = {
            "name": name,
            "files": entries,
            "rows": rows,
            "source_fingerprint": source_fingerprint,
            "created": _now(),
            **({"ids": ids} if ids is not None else {}),
        }
        part_manifest = {
            **part,
            "header": header,
            "schema": {fld.name: str(fld.type) for fld in schema} if schema else {},
        }
        if self.remote:
            storage.write_text(
                storage.join(str(staging), PART_MANIFEST), json.dumps(part_manifest, indent=2, sort_keys=True)
            )
        else:
            _atomic_write_json(Path(staging) / PART_MANIFEST, part_manifest)
            part_dir = Path(self.dir) / "parts" / name
            part_dir.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging, part_dir)
            _fsync(part_dir.parent)
        m["parts"].append(part)
        m["rows"] = sum(p["rows"] for p in m["parts"])
        if schema is not None and not m.get("schema"):
            m["schema"] = {fld.name: str(fld.type) for fld in schema}
        m["updated"] = _now()
        self.write_manifest(m)
        if self.remote:
            self._committed.add(str(staging))
        return m

    def write_manifest(self, m: dict[str, Any]) -> None:
        """Replace the manifest in one step (a rename locally, one object remotely)."""
        if self.remote:
            storage.write_text(self.manifest_path, json.dumps(m, indent=2, sort_keys=True))
        else:
            Path(self.dir).mkdir(parents=True, exist_ok=True)
            _atomic_write_json(self.manifest_path, m)
            _fsync(Path(self.dir))

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive per-cache lock (a scheduled retrain beside a manual run must not both add a part).
        Object stores have no locks: remote caches are not serialised (see the module docstring)."""
        if self.remote:
            yield
            return
        Path(self.dir).mkdir(parents=True, exist_ok=True)
        with open(Path(self.dir) / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def staged_files(staging: Any) -> list[str]:
    """The Parquet files a teach or fusion stage wrote into its staging location, sorted."""
    return storage.files_under(str(staging), (".parquet",))


def _part_name() -> str:
    """Remote part names sort by creation time (local ones by their number in the manifest)."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _type_from_str(s: str) -> pa.DataType:
    """Parse the few Arrow type strings the manifest records (for empty reads)."""
    simple = {
        "string": pa.string(),
        "float": pa.float32(),
        "int32": pa.int32(),
        "int64": pa.int64(),
        "halffloat": pa.float16(),
    }
    if s in simple:
        return simple[s]
    if s.startswith("fixed_size_list<"):
        inner, size = s[len("fixed_size_list<") :].rsplit(">[", 1)
        item = inner.split(":", 1)[1].strip()
        return pa.list_(_type_from_str(item), int(size.rstrip("]")))
    return pa.string()
