"""Dynamic padding: a causal-LM batch loses the columns that are padding in every row, and the
step computes exactly what it did on the full width (kdpipe.lm.padding)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kdpipe.lm.padding import trim_to_longest

LENGTHS = [4, 7, 2]  # real tokens per row; the cache pads every row to T = 10
T, K = 10, 4


def _mask() -> torch.Tensor:
    return (torch.arange(T)[None] < torch.tensor(LENGTHS)[:, None]).long()


def test_each_teacher_is_cut_by_its_own_mask() -> None:
    """Two tokenizers with the same max_length (the cross-tokenizer `uld` case) tokenise a row to
    different lengths: each teacher's columns keep that teacher's longest row."""
    short = (torch.arange(T)[None] < torch.tensor([3, 5])[:, None]).long()
    long = (torch.arange(T)[None] < torch.tensor([8, 6])[:, None]).long()
    batch = {
        "attention_mask": short,
        "a.attention_mask": short,
        "a.input_ids": short.clone(),
        "b.attention_mask": long,
        "b.input_ids": long.clone(),
        "b.topk_logp": torch.zeros(2, T, K),
    }
    out = trim_to_longest(batch)
    assert {k: v.shape[1] for k, v in out.items()} == {
        "attention_mask": 5,
        "a.attention_mask": 5,
        "a.input_ids": 5,
        "b.attention_mask": 8,
        "b.input_ids": 8,
        "b.topk_logp": 8,
    }
    assert int(out["b.attention_mask"].sum()) == int(long.sum())  # no real token of b is lost


def test_only_token_columns_are_cut_after_the_longest_row() -> None:
    mask = _mask()
    batch = {
        "attention_mask": mask,
        "lm.attention_mask": mask,
        "lm.input_ids": torch.ones(3, T, dtype=torch.long),
        "lm.topk_ids": torch.zeros(3, T, K, dtype=torch.long),
        "lm.tail_logp": torch.zeros(3, T),
        "lm.hidden.2": torch.zeros(3, T, 8),
        "fused.weights": torch.zeros(3, T),  # per row, not per token
        "label": torch.full((3,), -1),
        "lm.attn_rel": torch.zeros(3, T, T, T),
    }
    out = trim_to_longest(batch)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "attention_mask": (3, 7),
        "lm.attention_mask": (3, 7),
        "lm.input_ids": (3, 7),
        "lm.topk_ids": (3, 7, K),
        "lm.tail_logp": (3, 7),
        "lm.hidden.2": (3, 7, 8),
        "fused.weights": (3, T),
        "label": (3,),
        "lm.attn_rel": (3, T, T, T),
    }
    assert torch.equal(out["attention_mask"], mask[:, :7])
    full = {k: v for k, v in batch.items() if k != "lm.attention_mask"} | {
        "attention_mask": torch.ones(3, T, dtype=torch.long)
    }
    assert trim_to_longest(full) is full  # nothing to cut (and "lm." has no mask of its own)
    plain = {"x": torch.zeros(3, 64)}
    assert trim_to_longest(plain) is plain  # no token mask: unchanged


@pytest.fixture(scope="module")
def student_and_batch(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, torch.Tensor]]:
    from kdpipe.lm.corpus import default_tokenizer
    from students.causal_lm import CausalLMStudent
    from tests.test_lm_models import save_tiny_llama

    d = tmp_path_factory.mktemp("tiny")
    save_tiny_llama(d, default_tokenizer(), layers=2)
    student = CausalLMStudent(tokens_from="lm", teacher_path=str(d), num_layers=1, init_from_teacher_layers=[1])
    g = torch.Generator().manual_seed(0)
    mask = _mask()
    vocab = student.hf_model.config.vocab_size
    ids = torch.randint(5, vocab, (3, T), generator=g) * mask
    topk_logp = torch.log_softmax(torch.randn(3, T, K + 1, generator=g), -1).sort(-1, descending=True).values
    batch = {
        "lm.input_ids": ids,
        "lm.attention_mask": mask,
        "input_ids": ids.clone(),
        "attention_mask": mask.clone(),
        "lm.topk_ids": torch.randint(0, vocab, (3, T, K), generator=g),
        "lm.topk_logp": topk_logp[..., :K],
        "lm.tail_logp": topk_logp[..., K],
        "label": torch.full((3,), -1),
    }
    return student, batch


def _loss_and_grads(student: Any, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    from kdpipe.losses.base import LossContext
    from kdpipe.losses.suite import LossSuite

    losses = LossSuite([{"name": "forward_kl"}, {"name": "lm_ce"}], LossContext(0, ["lm"]))
    student.zero_grad()
    value, _ = losses(student(batch), batch)
    value.backward()
    return float(value.detach()), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


def test_the_trimmed_step_computes_the_same_loss_and_gradients(student_and_batch) -> None:
    student, batch = student_and_batch
    assert student.pads_to_longest
    trimmed = trim_to_longest(batch)
    assert trimmed["lm.input_ids"].shape == (3, max(LENGTHS))
    full_value, full_grads = _loss_and_grads(student, batch)
    cut_value, cut_grads = _loss_and_grads(student, trimmed)
    assert cut_value == pytest.approx(full_value, rel=1e-5)
    assert full_grads.keys() == cut_grads.keys() and full_grads
    for name, g in full_grads.items():
        torch.testing.assert_close(cut_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_the_train_loop_steps_on_trimmed_batches(student_and_batch) -> None:
    """`run_epoch` cuts a causal-LM student's batches, in training and in validation."""
    from kdpipe.losses.base import LossContext
    from kdpipe.losses.suite import LossSuite
    from kdpipe.spec import TrainConfig
    from kdpipe.train import DistilModule, LoopConfig, StudentMeta, run_epoch

    student, batch = student_and_batch
    widths: list[int] = []
    forward = student.forward
    student.forward = lambda b: (widths.append(b["lm.input_ids"].shape[1]), forward(b))[1]  # type: ignore[method-assign]

    class Shard:  # the EpochReplay interface: one batch per epoch
        def batches(self, *args: Any) -> Any:
            yield dict(batch)

    model = DistilModule(student, LossSuite([{"name": "forward_kl"}, {"name": "lm_ce"}], LossContext(0, ["lm"])))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    try:
        loop = LoopConfig(TrainConfig(batch_size=3), StudentMeta(None, 0, ["lm"], {}), "causal_lm", [], 0, "", "")
        metrics = run_epoch(model, opt, Shard(), Shard(), loop, 0, 0, torch.device("cpu"), None)
    finally:
        del student.forward
    assert widths == [max(LENGTHS), max(LENGTHS)]  # the training step, then validation
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))


def test_the_cut_is_a_no_op_for_outputs_at_real_positions(student_and_batch) -> None:
    """Why it is safe: a causal LM's logits at real positions ignore the padding after them."""
    student, batch = student_and_batch
    with torch.no_grad():
        full = student(batch)["logits"]
        cut = student(trim_to_longest(batch))["logits"]
    real = batch["attention_mask"][:, : cut.shape[1]].bool()
    torch.testing.assert_close(cut[real], full[:, : cut.shape[1]][real], rtol=1e-4, atol=1e-5)


def test_students_that_are_not_causal_do_not_opt_in() -> None:
    """Bidirectional encoders see the padding columns through attention masks but keep relation
    matrices of the full width; they must not be cut."""
    from students.hf_classifier import HFClassifierStudent
    from students.hf_encoder import HFEncoderStudent

    for cls in (HFClassifierStudent, HFEncoderStudent):
        assert not getattr(cls, "pads_to_longest", False), cls
