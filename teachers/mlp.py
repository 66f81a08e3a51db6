"""A trainable MLP classifier teacher for vector inputs (the digits demo, a user's own table).

kdpipe trains it on the labeled train rows (optionally only some classes, to make specialised
experts for logit fusion) and keeps it with the ids of the rows it was fitted on, under
``<storage>/teachers/mlp_classifier/<digest of params and rows>``. A later run reuses a copy with
the same params only when every row it was fitted on is a train row of this run's source; a
copy fitted on rows that are now val/test rows, or on rows this source does not hold (it changed,
or its ids are made another way: a CSV and a Parquet file of the same table give other content
hashes), is not reused — a new one is trained, and a line says why. So a teacher never scores a
test row it saw in training. New rows alone do not retrain it: the cache then grows by their rows
only.

With an explicit `path:` the weights are trained there when missing; weights found there that
fail the same check are refused with the fix, never silently served.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import nn

from kdpipe import storage, weights
from kdpipe.arrays import find_sorted, id_keys, to_numpy
from kdpipe.data import id_digest
from kdpipe.errors import KdpipeError
from teachers import TEACHERS
from teachers.base import Teacher

if TYPE_CHECKING:
    from kdpipe.data import SourceData
    from kdpipe.spec import TeacherConfig

log = logging.getLogger("kdpipe.teachers.mlp")

WEIGHTS = "model.safetensors"  # published last: a directory holding it is complete
FIT_IDS = "fit_ids.parquet"  # the ids of the rows the weights were fitted on
FIT_FORMAT = 2  # bumped when the way a fit is keyed changes


class MLPParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden: list[int] = [256, 256]
    dropout: float = Field(0.1, ge=0, lt=1)
    epochs: int = Field(300, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    classes: list[int] | None = Field(None, description="train only on these classes (a specialised expert)")
    train_on: str = Field(
        "labeled", pattern="^(labeled|all_train)$", description="labeled train rows, or all train rows"
    )
    seed: int = 0
    fit_rows: int = Field(
        200_000,
        ge=1,
        description="the teacher is fitted on at most this many train rows, streamed "
        "from the source by Ray Data and held in memory while it trains (≈ 4·dim bytes a row)",
    )


def build_mlp(in_dim: int, hidden: list[int], out_dim: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU(), nn.Dropout(dropout)]
        d = h
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


class FitPlan:
    """The rows a fit would train on (id, label, and where they are), and the key of that fit:
    params, input width, classes and the multiset of (id, label) pairs."""

    def __init__(self, source: SourceData, p: MLPParams) -> None:

        picked, n = [], 0
        for batch in _index_batches(source):
            mask = pc.and_(pc.equal(batch["split"], "train"), pc.greater_equal(batch["label"], 0))
            if p.train_on == "labeled":  # the labels the student may see too; all_train: every train label
                mask = pc.and_(mask, batch["labeled"])
            if p.classes is not None:
                mask = pc.and_(mask, pc.is_in(batch["label"], value_set=pa.array(p.classes, pa.int64())))
            sel = batch.filter(mask).slice(0, p.fit_rows - n)
            picked.append(sel)
            n += sel.num_rows
            if n >= p.fit_rows:
                break
        cols = ["id", "label"] + (["file", "row"] if source.cfg is not None else [])
        self.rows = pa.concat_tables(picked).select(cols) if picked else pa.table({c: [] for c in cols})
        tally = sum(id_digest(f"{i}:{y}") for i, y in zip(self.rows["id"].to_pylist(), self.rows["label"].to_pylist()))
        self.recipe = {
            "format": FIT_FORMAT,
            "params": p.model_dump(),
            "in_dim": source.dim,
            "num_classes": source.num_classes,
        }
        self.identity = {**self.recipe, "rows": self.rows.num_rows, "rows_digest": tally % 2**64}
        self.key = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:16]

    def inputs(self, source: SourceData) -> tuple[np.ndarray, np.ndarray]:
        """The planned rows' inputs and labels, in plan order (a deterministic fit), read by Ray Data
        so that only these rows reach the driver."""
        import ray

        if self.rows.num_rows == 0:
            return np.zeros((0, source.dim or 1), np.float32), np.zeros(0, np.int64)
        parts = [t for t in ray.get(source.rows_dataset(ray.data.from_arrow(self.rows)).to_arrow_refs()) if t.num_rows]
        got = pa.concat_tables(parts)
        got = got.take(pc.index_in(self.rows["id"], value_set=got["id"]))
        return to_numpy(got["x"], np.float32), got["label"].to_numpy()


def _index_batches(source: SourceData) -> Any:
    if source.index_path is None:
        yield source.index
        return
    import pyarrow.parquet as pq

    with storage.open_input(source.index_path) as fh:
        for b in pq.ParquetFile(fh).iter_batches(batch_size=65536):
            yield pa.Table.from_batches([b])


def _read_meta(path: str) -> dict[str, Any]:
    return json.loads(storage.read_text(storage.join(path, "config.json")))


def leak_check(path: str, source: SourceData) -> str | None:
    """Why the copy at `path` must not score this source's rows, or None: every row it was fitted
    on must be a train row of this source (read: its ids against the index, a batch at a time)."""

    try:
        with storage.open_input(storage.join(path, FIT_IDS)) as fh:
            import pyarrow.parquet as pq

            fitted = np.sort(id_keys(pq.read_table(fh, columns=["id"])["id"]))
    except (FileNotFoundError, OSError):
        return "it records no ids of the rows it was fitted on (trained by an older kdpipe)"
    if len(fitted) == 0:
        return None
    seen = np.zeros(len(fitted), bool)
    held_out = 0
    for batch in _index_batches(source):
        pos, hit = find_sorted(fitted, id_keys(batch["id"]))
        if hit.any():
            seen[pos[hit]] = True
            held_out += int(pc.sum(pc.not_equal(batch["split"].filter(pa.array(hit)), "train")).as_py() or 0)
    missing = int((~seen).sum())
    if held_out:
        return f"{held_out} of the {len(fitted)} rows it was fitted on are val/test rows of this source"
    if missing:
        return (
            f"{missing} of the {len(fitted)} rows it was fitted on are not rows of this source (the source changed, "
            "or its row ids are made another way, e.g. another file format or a new source.id_column), so they "
            "could be among its test rows"
        )
    return None


def _copies(home: str, recipe: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Published copies under `home` with this recipe, newest first: (path, config)."""
    try:
        found = [f for f in storage.files_under(home, (".json",)) if storage.name(f) == "config.json"]
    except (FileNotFoundError, OSError):
        return []
    out = []
    for f in found:
        path = storage.parent(f)
        try:
            meta = json.loads(storage.read_text(f))
        except (OSError, ValueError):
            continue
        if meta.get("recipe") == recipe and weights.exists(path, WEIGHTS):
            out.append((path, meta))
    return sorted(out, key=lambda pm: pm[1].get("trained_at", ""), reverse=True)


@TEACHERS.register("mlp_classifier")
class MLPTeacher(Teacher):
    Params = MLPParams
    supported_outputs = {"logits", "topk"}

    def __init__(self, net: nn.Module, device: str) -> None:
        self.net = net.eval().to(device)
        self.device = device

    @classmethod
    def home(cls, storage_root: str) -> str:
        return storage.join(storage.Layout(storage_root).teachers, "mlp_classifier")

    @classmethod
    def resolve(cls, cfg: TeacherConfig, source: SourceData, storage_root: str) -> TeacherConfig:
        if cfg.path:
            return cfg
        plan = FitPlan(source, MLPParams(**cfg.params))
        for path, _ in _copies(cls.home(storage_root), plan.recipe):
            if leak_check(path, source) is None:
                return cfg.model_copy(update={"path": path})
        return cfg.model_copy(update={"path": storage.join(cls.home(storage_root), plan.key)})

    @classmethod
    def prepare(cls, cfg: TeacherConfig, source: SourceData, storage_root: str) -> TeacherConfig:
        p = MLPParams(**cfg.params)
        plan = FitPlan(source, p)
        if cfg.path:
            if weights.exists(cfg.path, WEIGHTS):
                meta = _read_meta(cfg.path)
                why = ("its params differ" if meta.get("recipe") != plan.recipe else None) or leak_check(
                    cfg.path, source
                )
                if why is not None:
                    raise KdpipeError(
                        f"teacher '{cfg.id}': the weights at {storage.display(cfg.path)} cannot serve this "
                        f"run: {why}. Delete that directory to train it again there, or remove "
                        f"teachers[{cfg.id}].path so that kdpipe keeps its teachers under `storage:`"
                    )
                log.info("teacher %s: reusing %s", cfg.id, storage.display(cfg.path))
                return cfg
            cls._train(cfg, p, plan, source, cfg.path)
            return cfg
        home = cls.home(storage_root)
        reasons = []
        for path, meta in _copies(home, plan.recipe):
            why = leak_check(path, source)
            if why is None:
                log.info(
                    "teacher %s: reusing %s (fitted on %s rows, every one a train row of this source)",
                    cfg.id,
                    storage.display(path),
                    meta.get("trained_rows"),
                )
                return cfg.model_copy(update={"path": path})
            reasons.append(f"{storage.display(path)}: {why}")
        path = storage.join(home, plan.key)
        if reasons:
            log.info("teacher %s: training a new copy; not reusing %s", cfg.id, "; ".join(reasons))
        cls._train(cfg, p, plan, source, path)
        return cfg.model_copy(update={"path": path})

    @classmethod
    def _train(cls, cfg: TeacherConfig, p: MLPParams, plan: FitPlan, source: SourceData, path: str) -> None:
        if plan.rows.num_rows == 0:
            raise KdpipeError(
                f"teacher '{cfg.id}': no labeled train rows to train on; give the source a `label:` column "
                "with some non-null labels (and check source.split.labeled_fraction)"
            )
        x, y = plan.inputs(source)
        torch.manual_seed(p.seed)
        net = build_mlp(x.shape[1], p.hidden, int(source.num_classes or 0), p.dropout)
        opt = torch.optim.AdamW(net.parameters(), lr=p.lr, weight_decay=p.weight_decay)
        xt, yt = torch.tensor(x), torch.tensor(y)
        g = torch.Generator().manual_seed(p.seed)
        net.train()
        log.info("teacher %s: training on %d labeled train rows, %d epochs", cfg.id, len(yt), p.epochs)
        start = last = time.monotonic()
        for epoch in range(p.epochs):
            perm = torch.randperm(len(yt), generator=g)
            total = 0.0
            for i in range(0, len(perm), 64):
                idx = perm[i : i + 64]
                loss = nn.functional.cross_entropy(net(xt[idx]), yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            now = time.monotonic()
            if now - last >= 5.0 or epoch == p.epochs - 1:  # a line every few seconds, like the student's epochs
                per = (now - start) / (epoch + 1)
                log.info(
                    "teacher %s epoch %d/%d: train_loss %.4f (%.2f s/epoch, ETA %.0f s)",
                    cfg.id,
                    epoch + 1,
                    p.epochs,
                    total / max(len(yt), 1),
                    per,
                    per * (p.epochs - epoch - 1),
                )
                last = now
        with tempfile.TemporaryDirectory(prefix="kdpipe-teacher-") as d:
            tmp = Path(d)
            (tmp / "config.json").write_text(
                json.dumps(
                    {
                        "in_dim": int(x.shape[1]),
                        "num_classes": int(source.num_classes or 0),
                        "hidden": p.hidden,
                        "dropout": p.dropout,
                        "trained_rows": int(len(y)),
                        "classes": p.classes,
                        "params": p.model_dump(),
                        "teacher_id": cfg.id,
                        "recipe": plan.recipe,
                        "fit": plan.identity,
                        "split": source.split,
                        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    },
                    indent=2,
                )
            )
            import pyarrow.parquet as pq

            pq.write_table(plan.rows.select(["id"]), tmp / FIT_IDS)
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp / WEIGHTS))
            if not weights.publish_dir(tmp, path, WEIGHTS):
                log.info("teacher %s: %s was trained by another process meanwhile; using it", cfg.id, path)

    @classmethod
    def load(cls, cfg: TeacherConfig, device: str = "cpu") -> MLPTeacher:
        path = Path(cfg.path or "")
        if not cfg.path or not (path / WEIGHTS).exists():
            raise FileNotFoundError(
                f"teacher '{cfg.id}': no weights at {path}/{WEIGHTS}; run `kdpipe teach SPEC` to train it"
            )
        meta = json.loads((path / "config.json").read_text())
        net = build_mlp(meta["in_dim"], meta["hidden"], meta["num_classes"], meta["dropout"])
        net.load_state_dict(load_file(str(path / WEIGHTS)))
        return cls(net, device)

    @torch.no_grad()
    def forward(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = torch.as_tensor(np.require(batch["x"], np.float32, "W"), device=self.device)  # Arrow-backed: read-only
        return {"logits": self.net(x).float().cpu().numpy()}
