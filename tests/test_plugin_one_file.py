"""A new loss is one file: dropped into kdpipe/losses/, it is found by the spec check (its name, its
params, what it reads), trained with, and logged — with no other edit anywhere."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import uuid
from pathlib import Path

from tests.conftest import ROOT, tiny_overrides
from tests.servers import BIN
from tests.test_console import RAY_RESTART_LINE

LOSS = '''
"""Hinton KD whose temperature anneals: a made-up loss, the whole of it in this one file."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from kdpipe.losses import LOSSES
from kdpipe.losses.base import Loss
from kdpipe.losses.functional import kd_dense


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    teacher: str | None = Field(None, description="teacher id (default: the only teacher)")
    temperature: float = Field(4.0, gt=0)


@LOSSES.register("NAME")
class AnnealedKD(Loss):
    """T²·KL on the teacher's dense logits."""

    Params = Params

    @classmethod
    def teacher_reads(cls, params: Any) -> set[str]:
        return {"logits"}

    def forward(self, student: dict[str, Any], batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tid = self.ctx.teacher(self.p.teacher)
        value = kd_dense(student["logits"], batch[f"{tid}.logits"], self.p.temperature)
        return value, {"temperature": torch.tensor(self.p.temperature)}
'''


def test_a_loss_in_one_new_file_runs_from_a_spec(tmp_path: Path) -> None:
    """The spec check finds the new file's name, params and reads; `kdpipe run`, as a user runs it,
    trains with it and logs its parts. The same console also shows that the command keeps Ray's
    benign native line off it (a teacher pool makes Ray's core worker log it: tests/test_console.py)."""
    name = f"annealed_kd_{uuid.uuid4().hex[:6]}"
    plugin = ROOT / "kdpipe" / "losses" / f"{name}.py"
    plugin.write_text(textwrap.dedent(LOSS).replace("NAME", name))
    try:
        o = tiny_overrides(
            tmp_path,
            **{
                "losses": [{"name": name, "temperature": 3.0}, {"name": "ce"}],
                "evaluate.baseline": False,
                "train.epochs": 2,
                "train.checkpoint_every": 2,
                "source.limit": 600,
            },
        )
        sets = [a for k, v in o.items() for a in ("--set", f"{k}={json.dumps(v)}")]
        env = {**os.environ, "RAY_ADDRESS": ""}

        def kdpipe(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [str(BIN / "kdpipe"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
            )

        bad = kdpipe(
            "validate",
            "pipelines/digits_kd.yaml",
            *sets,
            "--set",
            "teachers.0.outputs=[topk]",
            "--set",
            "teachers.0.topk=4",
        )
        assert bad.returncode == 2 and f"({name}) reads teacher 'digits_mlp' outputs ['logits']" in bad.stderr, (
            bad.stderr
        )
        out = kdpipe("run", "pipelines/digits_kd.yaml", *sets)
        assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
        assert RAY_RESTART_LINE not in out.stderr, out.stderr[-3000:]
        from mlflow.tracking import MlflowClient

        client = MlflowClient(o["tracking.tracking_uri"])
        [r] = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert f"train_{name}.temperature" in r.data.metrics and f"train_{name}" in r.data.metrics
        assert r.data.params["losses.0.name"] == name
    finally:
        plugin.unlink(missing_ok=True)
