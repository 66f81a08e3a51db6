"""A trainable MLP classifier teacher for vector inputs (the digits demo).

When its weights directory does not exist, `prepare` trains it on the labeled train rows
(optionally only some classes, to make specialised experts for logit fusion) and saves it with
safetensors; afterwards the weights digest makes every cache reuse explicit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import nn

from kdpipe.arrays import to_numpy
from kdpipe.config import KdpipeError
from teachers import TEACHERS
from teachers.base import Teacher

if TYPE_CHECKING:
    from kdpipe.config import TeacherConfig
    from kdpipe.sources import SourceData


class MLPParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden: list[int] = [256, 256]
    dropout: float = Field(0.1, ge=0, lt=1)
    epochs: int = Field(300, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    classes: list[int] | None = Field(None, description="train only on these classes (a specialised expert)")
    train_on: str = Field("labeled", pattern="^(labeled|all_train)$", description="labeled train rows, or all train rows")
    seed: int = 0
    fit_rows: int = Field(200_000, ge=1, description="the teacher is fitted on at most this many train rows, streamed "
                          "from the source by Ray Data and held in memory while it trains (≈ 4·dim bytes a row)")


def build_mlp(in_dim: int, hidden: list[int], out_dim: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU(), nn.Dropout(dropout)]
        d = h
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


def _check_reuse(tid: str, path: Path, params: dict, split: dict) -> None:
    """Reusing saved weights is only right if they were trained the way the spec says, on rows that
    are still train rows (splits are hashes of the row id and the split settings)."""
    meta = json.loads((path / "config.json").read_text())
    fix = f"delete {path} to retrain it, or point teachers[{tid}].path elsewhere"
    saved = {**MLPParams().model_dump(), **meta["params"]} if meta.get("params") is not None else None
    if saved is not None and saved != params:  # keys added since the weights were saved count as their defaults
        raise KdpipeError(f"teacher '{tid}': weights at {path} were trained with params {saved}, the spec says {params}; {fix}")
    if meta.get("split") is not None and meta["split"] != split:
        raise KdpipeError(f"teacher '{tid}': weights at {path} were trained under source.split {meta['split']}; with {split} "
                         f"some of its training rows may now be val/test rows; {fix}")


def _fit_rows(source: "SourceData", p: MLPParams) -> tuple[np.ndarray, np.ndarray]:
    """The first `fit_rows` labeled train rows in source order (x, y): positions are scanned from
    the index a batch at a time, the inputs read by Ray Data, so only those rows reach the driver."""
    import ray

    picked, n = [], 0
    for batch in _index_batches(source):
        mask = pc.equal(batch["split"], "train")
        if p.train_on == "labeled":
            mask = pc.and_(mask, batch["labeled"])
        sel = batch.filter(mask).slice(0, p.fit_rows - n)
        picked.append(sel)
        n += sel.num_rows
        if n >= p.fit_rows:
            break
    want = pa.concat_tables(picked).select(["id", "label"] + (["file", "row"] if source.cfg is not None else []))
    if want.num_rows == 0:
        return np.zeros((0, source.dim or 1), np.float32), np.zeros(0, np.int64)
    parts = [t for t in ray.get(source.rows_dataset(ray.data.from_arrow(want)).to_arrow_refs()) if t.num_rows]
    got = pa.concat_tables(parts)
    got = got.take(pc.index_in(want["id"], value_set=got["id"]))  # source order: a deterministic fit
    return to_numpy(got["x"], np.float32), got["label"].to_numpy()


def _index_batches(source: "SourceData") -> Any:
    if source.index_path is None:
        yield source.index
        return
    import pyarrow.parquet as pq

    for b in pq.ParquetFile(source.index_path).iter_batches(batch_size=65536):
        yield pa.Table.from_batches([b])


@TEACHERS.register("mlp_classifier")
class MLPTeacher(Teacher):
    Params = MLPParams

    def __init__(self, net: nn.Module, device: str) -> None:
        self.net = net.eval().to(device)
        self.device = device

    @classmethod
    def check_config(cls, cfg: "TeacherConfig") -> None:
        if not cfg.path:
            raise ValueError("mlp_classifier needs `path:` (its weights directory; trained there when missing)")

    @classmethod
    def prepare(cls, cfg: "TeacherConfig", source: "SourceData") -> None:
        path = Path(cfg.path)  # type: ignore[arg-type]
        p = MLPParams(**cfg.params)
        split = {k: v for k, v in source.split.items() if k != "labeled_fraction"}
        if (path / "model.safetensors").exists():
            _check_reuse(cfg.id, path, p.model_dump(), split)
            return
        x, y = _fit_rows(source, p)
        keep = (y >= 0) if p.classes is None else np.isin(y, p.classes)
        x, y = x[keep], y[keep]
        if len(y) == 0:
            raise KdpipeError(f"teacher '{cfg.id}': no labeled train rows to train on; give the source a `label:` column "
                             "or raise source.split.labeled_fraction")
        num_classes = source.num_classes
        torch.manual_seed(p.seed)
        net = build_mlp(x.shape[1], p.hidden, num_classes, p.dropout)  # type: ignore[arg-type]
        opt = torch.optim.AdamW(net.parameters(), lr=p.lr, weight_decay=p.weight_decay)
        xt, yt = torch.tensor(x), torch.tensor(y)
        g = torch.Generator().manual_seed(p.seed)
        net.train()
        for _ in range(p.epochs):
            perm = torch.randperm(len(yt), generator=g)
            for i in range(0, len(perm), 64):
                idx = perm[i : i + 64]
                loss = nn.functional.cross_entropy(net(xt[idx]), yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / "model.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
        (path / "config.json").write_text(
            json.dumps({"in_dim": int(x.shape[1]), "num_classes": num_classes, "hidden": p.hidden, "dropout": p.dropout,
                        "trained_rows": int(len(y)), "classes": p.classes, "params": p.model_dump(), "split": split}, indent=2)
        )
        tmp.rename(path / "model.safetensors")  # the weights file appears last: a crash leaves no half teacher

    @classmethod
    def load(cls, cfg: "TeacherConfig", device: str = "cpu") -> "MLPTeacher":
        path = Path(cfg.path)  # type: ignore[arg-type]
        if not (path / "model.safetensors").exists():
            raise FileNotFoundError(
                f"teacher '{cfg.id}': no weights at {path}/model.safetensors; run `kdpipe teach SPEC` to train it"
            )
        meta = json.loads((path / "config.json").read_text())
        net = build_mlp(meta["in_dim"], meta["hidden"], meta["num_classes"], meta["dropout"])
        net.load_state_dict(load_file(str(path / "model.safetensors")))
        return cls(net, device)

    @torch.no_grad()
    def forward(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = torch.as_tensor(batch["x"], dtype=torch.float32, device=self.device)
        return {"logits": self.net(x).float().cpu().numpy()}
