"""Student vs teacher inference speed at equal batch size, with the quality each keeps (digits)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.common import best_of, save


def main(batch: int = 512) -> dict:
    from kdpipe.arrays import to_numpy
    from kdpipe.config import SourceConfig, TeacherConfig
    from kdpipe.data import load_source
    from kdpipe.losses.functional import kd_dense, masked_ce
    from kdpipe.train import make_optimizer
    from students.mlp import MLPStudent
    from teachers.mlp import MLPTeacher

    src = load_source(SourceConfig(kind="sklearn_digits", split={"labeled_fraction": 0.1}))
    tmp = Path(tempfile.mkdtemp())
    tcfg = TeacherConfig(
        id="t", kind="mlp_classifier", path=str(tmp / "t"), params={"hidden": [512, 512], "epochs": 300, "dropout": 0.2}
    )
    MLPTeacher.prepare(tcfg, src, str(tmp))
    teacher = MLPTeacher.load(tcfg).net
    t = src.table
    split = np.array(t["split"].to_pylist())
    x = torch.from_numpy(to_numpy(t["x"], np.float32).copy())
    y = torch.from_numpy(t["label"].to_numpy().copy())
    labeled = torch.from_numpy(np.array(t["labeled"].to_pylist()))
    train, test = torch.from_numpy(split == "train"), torch.from_numpy(split == "test")
    with torch.no_grad():
        tlog = teacher(x)
    torch.manual_seed(0)
    student = MLPStudent(64, 10, [32])
    opt = make_optimizer(student.parameters(), 5e-3)  # what kdpipe's training loop uses
    yl = torch.where(labeled, y, torch.full_like(y, -1))
    for _ in range(40):  # the demo's recipe, in-process: KD on all train rows + CE on the labeled ones
        perm = torch.nonzero(train).squeeze(1)[torch.randperm(int(train.sum()))]
        for i in range(0, len(perm), 64):
            b = perm[i : i + 64]
            s = student({"x": x[b]})["logits"]
            loss = kd_dense(s, tlog[b], 4.0) + masked_ce(s, yl[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    student.eval()
    xb = x[:batch].contiguous()
    with torch.no_grad():
        t_teacher = best_of(lambda: [teacher(xb) for _ in range(50)], 5) / 50
        t_student = best_of(lambda: [student({"x": xb}) for _ in range(50)], 5) / 50
        acc_t = float((teacher(x[test]).argmax(1) == y[test]).float().mean())
        acc_s = float((student({"x": x[test]})["logits"].argmax(1) == y[test]).float().mean())
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    out = {
        "batch_size": batch,
        "teacher_params": params(teacher),
        "student_params": params(student),
        "teacher_ms_per_batch": t_teacher * 1e3,
        "student_ms_per_batch": t_student * 1e3,
        "speedup": t_teacher / t_student,
        "teacher_test_acc": acc_t,
        "student_test_acc": acc_s,
        "quality_retained": acc_s / acc_t,
    }
    save("student_speed_digits", out)
    print(
        f"digits, batch {batch}: teacher {t_teacher * 1e3:.3f} ms ({out['teacher_params']:,} params, acc {acc_t:.3f}), "
        f"student {t_student * 1e3:.3f} ms ({out['student_params']:,} params, acc {acc_s:.3f}) -> "
        f"{t_teacher / t_student:.1f}x faster, {acc_s / acc_t:.1%} of teacher accuracy"
    )
    return out


if __name__ == "__main__":
    main()
