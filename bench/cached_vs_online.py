"""Cached vs online distillation: time per epoch of a student trained from cached teacher logits vs
one that runs the teacher every step (same student, data, batch size, optimizer), side by side."""

from __future__ import annotations

import torch

from bench.common import best_of, save


def main(rows: int = 20_000, hidden: tuple[int, ...] = (2048, 2048), batch: int = 256) -> dict:
    from kdpipe.losses.functional import kd_dense
    from kdpipe.train import make_optimizer
    from students.mlp import MLPStudent
    from teachers.mlp import build_mlp

    torch.manual_seed(0)
    teacher = build_mlp(64, list(hidden), 10, 0.0).eval()
    x = torch.rand(rows, 64)
    with torch.no_grad():
        cached = torch.cat([teacher(x[i : i + 4096]) for i in range(0, rows, 4096)])
    student = MLPStudent(64, 10, [32])
    opt = make_optimizer(student.parameters(), 1e-3)  # what kdpipe's training loop uses

    def epoch(online: bool) -> None:
        for i in range(0, rows, batch):
            xb = x[i : i + batch]
            if online:
                with torch.no_grad():
                    t = teacher(xb)
            else:
                t = cached[i : i + batch]
            loss = kd_dense(student({"x": xb})["logits"], t, 4.0)
            opt.zero_grad()
            loss.backward()
            opt.step()

    t_cached = best_of(lambda: epoch(False), 3)
    t_online = best_of(lambda: epoch(True), 3)
    out = {"rows": rows, "teacher_hidden": list(hidden), "student_hidden": [32], "batch_size": batch,
           "epoch_s_cached": t_cached, "epoch_s_online": t_online, "speedup": t_online / t_cached}
    save("cached_vs_online_digits", out)
    print(f"digits MLP{list(hidden)} -> MLP[32], {rows} rows: cached {t_cached:.2f} s/epoch, online {t_online:.2f} s/epoch "
          f"-> cache is {t_online / t_cached:.1f}x faster")
    return out


if __name__ == "__main__":
    main()
