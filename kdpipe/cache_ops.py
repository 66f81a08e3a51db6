"""`kdpipe cache verify | repair`: check a spec's teacher caches part by part, and mend them.

Verify reads every file of every part and checks it against its sha256, lists parts that no
manifest names, and reports a manifest that was lost. Repair makes the cache whole again without
teaching anything that is still good: a lost manifest is rebuilt from the parts' own manifests
(parts that fail their checksums, or repeat ids of an earlier part, are left out); damaged parts
are dropped from the manifest and deleted; parts no manifest names are deleted; then the teach
stage teaches the rows the cache now lacks — exactly the dropped parts' rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from kdpipe import storage
from kdpipe.arrays import id_keys
from kdpipe.cache import FORMAT_VERSION, MANIFEST, PART_MANIFEST, TeacherCache
from kdpipe.pipeline import prepare, teach
from kdpipe.spec import PipelineConfig
from kdpipe.teach import cache_of

log = logging.getLogger("kdpipe.cache")


@dataclass
class CacheReport:
    """What was found (and done) per cache, as lines a person reads."""

    lines: list[str] = field(default_factory=list)
    ok: bool = True

    def add(self, line: str, bad: bool = False) -> None:
        self.lines.append(line)
        self.ok = self.ok and not bad

    def text(self) -> str:
        return "\n".join(
            self.lines + [("all caches verified" if self.ok else "damage found: run `kdpipe cache repair SPEC`")]
        )


def _caches(cfg: PipelineConfig, source: Any) -> list[tuple[str, TeacherCache]]:

    return [(t.id, cache_of(cfg, t, source)[2]) for t in cfg.teachers]


def damaged_parts(cache: TeacherCache) -> dict[str, str]:
    """Part name -> why, for the parts of the manifest whose files fail their checksums."""
    bad = {}
    for part in (cache.manifest() or {}).get("parts", []):
        for f in part["files"]:
            why = cache.check_file(str(cache.location(f["path"])), f["sha256"])
            if why:
                bad[part["name"]] = f"{f['path']} {why}"
                break
    return bad


def verify_caches(cfg: PipelineConfig, address: str | None = None) -> CacheReport:

    source, _ = prepare(cfg, address)
    report = CacheReport()
    for tid, cache in _caches(cfg, source):
        m = cache.manifest()
        if m is None:
            lost = cache.part_dirs()
            report.add(
                f"cache[{tid}] {cache.dir}: "
                + (f"{len(lost)} part(s) but no {MANIFEST} (lost)" if lost else "not taught yet"),
                bad=bool(lost),
            )
            continue
        bad = damaged_parts(cache)
        orphans = cache.orphan_parts()
        for name, why in bad.items():
            report.add(f"cache[{tid}] part {name}: {why}", bad=True)
        for name in orphans:
            report.add(f"cache[{tid}] part {name}: on disk but named by no manifest (an interrupted run's)", bad=True)
        if not bad and not orphans:
            report.add(
                f"cache[{tid}] {cache.dir}: {m['rows']} rows in {len(m['parts'])} part(s), every file matches "
                "its checksum"
            )
    return report


def rebuild_manifest(cache: TeacherCache, report: CacheReport, tid: str) -> None:
    """A lost MANIFEST.json rebuilt from the parts' own manifests, oldest first: a part whose files
    fail their checksums, or that repeats ids of a part kept before it, is deleted instead."""
    parts = [(name, cache.part_manifest(name)) for name in cache.part_dirs()]
    for name, pm in parts:
        if pm is None:  # written by a run that never published it
            report.add(f"cache[{tid}] part {name}: has no {PART_MANIFEST} (an interrupted run's): deleted")
            storage.delete_dir(str(cache.location(f"parts/{name}")))
    parts = sorted((p for p in parts if p[1] is not None), key=lambda p: (p[1].get("created", ""), p[0]))
    kept: list[dict[str, Any]] = []
    seen = np.zeros(0, "S1")
    header: dict[str, Any] = {}
    for name, pm in parts:
        why = next(
            (
                f"{f['path']} {w}"
                for f in pm["files"]
                if (w := cache.check_file(str(cache.location(f["path"])), f["sha256"]))
            ),
            None,
        )
        ids = None
        if why is None:
            ids = np.concatenate(
                [
                    id_keys(pq.read_table(storage.open_input(str(cache.location(f["path"]))), columns=["id"])["id"])
                    for f in pm["files"]
                ]
                or [np.zeros(0, "S1")]
            )
            if len(seen) and np.isin(ids, seen).any():
                why = "repeats ids of an earlier part (an interrupted run's)"
        if why:
            report.add(f"cache[{tid}] part {name}: {why}: deleted; its rows are taught again")
            storage.delete_dir(str(cache.location(f"parts/{name}")))
            continue
        seen = np.concatenate([seen, ids]) if len(seen) else ids
        header = header or pm.get("header", {})
        kept.append({k: v for k, v in pm.items() if k not in ("header", "schema")})
        schema = pm.get("schema")
    if not kept:
        report.add(f"cache[{tid}] {cache.dir}: no part survived; the teach stage teaches every row")
        return
    m = {
        **header,
        "format": FORMAT_VERSION,
        "parts": kept,
        "rows": sum(p["rows"] for p in kept),
        "created": kept[0].get("created"),
        "updated": kept[-1].get("created"),
        "schema": schema,
        "rebuilt": True,
    }
    cache.write_manifest(m)
    report.add(f"cache[{tid}] {cache.dir}: {MANIFEST} rebuilt from {len(kept)} verified part(s), {m['rows']} rows")


def repair_caches(cfg: PipelineConfig, address: str | None = None) -> CacheReport:

    source, _ = prepare(cfg, address)
    report = CacheReport()
    for tid, cache in _caches(cfg, source):
        with cache.lock():
            if cache.manifest() is None:
                if cache.part_dirs():
                    rebuild_manifest(cache, report, tid)
                continue
            m = cache.manifest() or {}
            bad = damaged_parts(cache)
            if bad:
                m["parts"] = [p for p in m["parts"] if p["name"] not in bad]
                m["rows"] = sum(p["rows"] for p in m["parts"])
                cache.write_manifest(m)
                for name, why in bad.items():
                    storage.delete_dir(str(cache.location(f"parts/{name}")))
                    report.add(f"cache[{tid}] part {name}: {why}: dropped; its rows are taught again")
            for name in cache.orphan_parts():
                storage.delete_dir(str(cache.location(f"parts/{name}")))
                report.add(f"cache[{tid}] part {name}: named by no manifest (an interrupted run's): deleted")
    for tid, r in teach(cfg, source).items():
        report.add(f"cache[{tid}]: " + ("nothing to teach" if r.reused else f"taught {r.rows_taught} rows again"))
    return report
