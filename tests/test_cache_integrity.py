"""A damaged cache is caught before anything reads it, and mended without teaching what is still good.

Bytes flipped inside each column of a part file (the id column included, whose read decides which
rows are taught): the teach stage refuses before it reads an id, commits nothing, and names the
fix; `kdpipe cache verify` names the part; `kdpipe cache repair` drops it and teaches exactly its
rows again. A lost MANIFEST.json is rebuilt from the parts' own manifests, teaching nothing; a part
no manifest names (an interrupted run's) is deleted.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from kdpipe.cache_ops import CacheReport, damaged_parts, rebuild_manifest
from kdpipe.config import load_spec
from kdpipe.errors import CacheCorruptError
from kdpipe.pipeline import prepare, teach
from tests.conftest import tiny_overrides


def _flip_in_column(f: Path, column: str) -> None:
    """Flip 4 bytes in the middle of `column`'s data in the first row group of Parquet file `f`."""
    meta = pq.ParquetFile(f).metadata
    names = [meta.schema.column(i).path for i in range(meta.num_columns)]
    i = next(i for i, n in enumerate(names) if n == column or n.startswith(column + "."))
    chunk = meta.row_group(0).column(i)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    at = start + chunk.total_compressed_size // 2
    data = bytearray(f.read_bytes())
    for k in range(4):
        data[at + k] ^= 0xFF
    f.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def template(ray_local, tmp_path_factory):
    """One taught cache (and its trained teacher, index and MLflow store), taught once for the module."""
    root = tmp_path_factory.mktemp("taught")
    cfg = load_spec("pipelines/digits_kd.yaml", tiny_overrides(root))
    source, _ = prepare(cfg)
    teach(cfg, source)
    return root


@pytest.fixture
def taught(template: Path, tmp_path: Path):
    """A copy of the template under this test's own storage root, to damage at will."""
    shutil.copytree(template, tmp_path, dirs_exist_ok=True)
    cfg = load_spec("pipelines/digits_kd.yaml", tiny_overrides(tmp_path))
    source, _ = prepare(cfg)
    cache = _cache(cfg, source)
    assert cache.is_complete()
    return cfg, source, Path(cache.dir)


def _cache(cfg, source):
    from kdpipe.teach import cache_of

    return cache_of(cfg, cfg.teachers[0], source)[2]


@pytest.mark.parametrize("column", ["id", "logits", "topk_idx", "topk_val", "tail_lse"])
def test_a_byte_flip_in_any_column_is_caught_before_teach_reads_the_cache(taught, tmp_path: Path, column: str) -> None:
    cfg, source, cdir = taught
    before = (cdir / "MANIFEST.json").read_text()
    part_file = next((cdir / "parts").rglob("*.parquet"))
    _flip_in_column(part_file, column)
    with pytest.raises(CacheCorruptError, match="kdpipe cache repair"):
        teach(cfg, source)
    assert (cdir / "MANIFEST.json").read_text() == before  # nothing committed, no row taught
    assert len(list((cdir / "parts").iterdir())) == 1
    bad = damaged_parts(_cache(cfg, source))
    assert list(bad) == [part_file.parent.name] and "checksum" in bad[part_file.parent.name]


def test_repair_drops_the_damaged_part_and_teaches_only_its_rows(taught, tmp_path: Path, capsys) -> None:
    from kdpipe.cli import main

    cfg, source, cdir = taught
    part_file = next((cdir / "parts").rglob("*.parquet"))
    _flip_in_column(part_file, "id")
    sets = [a for k, v in tiny_overrides(tmp_path).items() for a in ("--set", f"{k}={json.dumps(v)}")]
    assert main(["cache", "verify", "pipelines/digits_kd.yaml", *sets]) == 1
    assert part_file.parent.name in capsys.readouterr().out
    assert main(["cache", "repair", "pipelines/digits_kd.yaml", *sets]) == 0
    out = capsys.readouterr().out
    assert "dropped" in out and f"taught {source.num_rows} rows again" in out
    m = json.loads((cdir / "MANIFEST.json").read_text())
    assert m["rows"] == source.num_rows and len(m["parts"]) == 1 and m["parts"][0]["name"] != part_file.parent.name
    ids = [i for f in (cdir / "parts").rglob("*.parquet") for i in pq.read_table(f, columns=["id"])["id"].to_pylist()]
    assert sorted(ids) == sorted(source.index["id"].to_pylist())  # every row once
    assert main(["cache", "verify", "pipelines/digits_kd.yaml", *sets]) == 0


def test_a_lost_manifest_is_rebuilt_from_the_parts_not_taught_again(taught) -> None:
    cfg, source, cdir = taught
    m = json.loads((cdir / "MANIFEST.json").read_text())
    (cdir / "MANIFEST.json").unlink()
    with pytest.raises(CacheCorruptError, match="no MANIFEST.json"):
        teach(cfg, source)  # not silently taught again, next to the old parts
    # a copy of the part (an interrupted run's duplicate) is left out of the rebuilt manifest
    part = next((cdir / "parts").iterdir())
    shutil.copytree(part, part.with_name("9999-duplicate"))
    report = CacheReport()
    rebuild_manifest(_cache(cfg, source), report, "digits_mlp")
    rebuilt = json.loads((cdir / "MANIFEST.json").read_text())
    assert [p["name"] for p in rebuilt["parts"]] == [p["name"] for p in m["parts"]] and rebuilt["rows"] == m["rows"]
    assert not (cdir / "parts" / "9999-duplicate").exists() and any("repeats ids" in line for line in report.lines)
    again = teach(cfg, source)["digits_mlp"]
    assert again.reused and again.rows_taught == 0
