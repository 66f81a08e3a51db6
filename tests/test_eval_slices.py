"""`evaluate.slices`: named groups of labels, each scored on its own rows next to the whole split
(per-domain perplexity of an LM student, per-category accuracy of a classifier)."""

from __future__ import annotations

import numpy as np
import pytest

from kdpipe.config import load_spec


def test_slices_parse_ids_and_ranges_and_name_the_key_when_wrong() -> None:
    cfg = load_spec("pipelines/digits_kd.yaml", {"evaluate.slices": {"round": [0, "6-9"], "straight": ["1-1", 7]}})
    assert cfg.evaluate.slices == {"round": [0, 6, 7, 8, 9], "straight": [1, 7]}
    for bad, why in (
        ({"Nouns": [1]}, "lowercase"),
        ({"teachers": [1]}, "collide"),
        ({"a": []}, "non-empty"),
        ({"a": ["5-2"]}, "neither"),
        ({"a": [-1]}, "neither"),
        ({"a": "3-28"}, "non-empty list"),
    ):
        with pytest.raises(Exception, match=why) as e:
            load_spec("pipelines/digits_kd.yaml", {"evaluate.slices": bad})
        assert "evaluate.slices" in str(e.value)


@pytest.mark.parametrize("in_driver", [True, False], ids=["in_driver", "scoring_actor"])
def test_each_slice_is_scored_on_its_own_rows_even_where_a_batch_lacks_them(ray_local, tmp_path, in_driver) -> None:
    """Accuracy per slice equals the hand count on that slice's rows; batches of 4 rows that hold
    no row of a slice (the rows are sorted by label) do not disturb the sums; cached teachers are
    sliced too. The same sums whether the small split is scored in the driver or by an actor."""
    import os

    import torch

    from kdpipe.evaluate import evaluate_models

    built_in = tmp_path / "pid"

    class Sign:  # local, so Ray pickles it by value
        def __call__(self) -> torch.nn.Module:
            built_in.write_text(str(os.getpid()))  # which process scored the split

            class M(torch.nn.Module):
                def forward(self, batch):
                    x = batch["x"].float()
                    return {"logits": torch.cat([-x, x, 0 * x], 1)}  # class 1 where x > 0, else 0

            return M()

    x = np.array([-1, 2, -3, 4, 5, -6, 7, -8, 9, 1, -1, 2], np.float32)[:, None]
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])  # sorted: the first batches hold one class only
    teacher = np.stack([np.where(labels == 2, 5.0, 0.0), np.zeros(12), np.zeros(12)], 1).astype(np.float32)  # always 0
    ds = ray_local.data.from_items([{"x": r, "label": int(l), "t.logits": t} for r, l, t in zip(x, labels, teacher)])
    pred = (x[:, 0] > 0).astype(int)
    scored = evaluate_models(
        "classification",
        {"test_": Sign()},
        ds,
        teachers=["t"],
        num_classes=3,
        batch_size=4,
        slices={"zeros": [0], "ones_and_twos": [1, 2], "absent": [7]},
        in_driver_bytes=2**20 if in_driver else 0,
    )
    assert (built_in.read_text() == str(os.getpid())) == in_driver
    m = scored.metrics
    assert m["test_acc"] == pytest.approx(np.mean(pred == labels))
    assert m["test_zeros_acc"] == pytest.approx(np.mean(pred[labels == 0] == 0))
    assert m["test_ones_and_twos_acc"] == pytest.approx(np.mean(pred[labels > 0] == labels[labels > 0]))
    # macro-F1 over the classes seen in the slice: class 0 (tp 2, 4 true, 2 predicted) and class 1 (predicted twice, never true)
    assert m["test_zeros_macro_f1"] == pytest.approx((2 * 2 / (4 + 2) + 0.0) / 2)
    assert not [k for k in m if "absent" in k]  # a slice with no rows has no metrics, not zeros
    assert m["teacher_t_test_zeros_acc"] == 1.0 and m["teacher_t_test_ones_and_twos_acc"] == 0.0
    assert m["teacher_t_test_acc"] == pytest.approx(4 / 12)
    assert set(scored.arrays) == {"test_", "teacher_t_test_"}  # the figures draw the whole split only
