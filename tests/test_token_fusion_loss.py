"""Train-time token-level fusion (`token_fusion_kl`): the fused top-k of two causal-LM teachers'
caches, per token in the batch, feeds forward KL. Checked against the single-teacher KL where the
fusion must reduce to one teacher, and for the dynamic mode's weights and gradients."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from kdpipe.losses import LOSSES, LossContext

B, T, V, K = 2, 6, 40, 5
CTX = LossContext(num_classes=0, teachers=["a", "b"])
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


def _sparse(logits: torch.Tensor, mask: torch.Tensor, tid: str) -> dict[str, torch.Tensor]:
    """A teacher's decoded top-k cache columns, padded as the views pad them (id 0, log-prob -inf, tail 0)."""
    lp = torch.log_softmax(logits, -1)
    vals, ids = lp.topk(K, -1)
    rest = lp.scatter(-1, ids, float("-inf"))
    tail = torch.logsumexp(rest, -1)
    pad = ~mask
    return {
        f"{tid}.topk_ids": ids.masked_fill(pad[..., None], 0),
        f"{tid}.topk_logp": vals.masked_fill(pad[..., None], float("-inf")),
        f"{tid}.tail_logp": tail.masked_fill(pad, 0.0),
        f"{tid}.input_ids": torch.arange(T).repeat(B, 1),
    }


def _batch(seed: int = 0, same: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False  # the second row is shorter
    ta = torch.randn(B, T, V, generator=g) * 3
    tb = ta.clone() if same else torch.randn(B, T, V, generator=g) * 3
    student = torch.randn(B, T, V, generator=g, requires_grad=True)
    return {"attention_mask": mask.long(), **_sparse(ta, mask, "a"), **_sparse(tb, mask, "b")}, student


def _loss(name: str, ctx: LossContext = CTX, **params):
    cls = LOSSES.get(name)
    return cls(cls.Params(**params), ctx)


def test_fusion_reduces_to_the_single_teacher_kl_where_it_must() -> None:
    """static weights (1, 0): the fused top-k + tail is teacher a's own (its top-k ids, their
    log-probs, its tail mass), so the loss equals forward KL against a; two identical teachers
    fused uniformly equal forward KL against either."""
    batch, s = _batch(0)
    fused, parts = _loss("token_fusion_kl", teachers=["a", "b"], mode="static", weights=[1.0, 0.0])(
        {"logits": s}, batch
    )
    only_a, _ = _loss("forward_kl", teacher="a")({"logits": s}, batch)
    assert float(fused) == pytest.approx(float(only_a), rel=1e-5)
    assert float(parts["w_a"]) == pytest.approx(1.0) and float(parts["w_b"]) == pytest.approx(0.0)

    batch, s = _batch(1, same=True)
    fused, _ = _loss("token_fusion_kl", teachers=["a", "b"], mode="uniform")({"logits": s}, batch)
    only_b, _ = _loss("forward_kl", teacher="b")({"logits": s}, batch)
    assert float(fused) == pytest.approx(float(only_b), rel=1e-5)


def test_dynamic_fusion_weights_are_per_token_on_the_simplex_and_the_student_gets_gradients() -> None:
    batch, s = _batch(2)
    loss, parts = _loss("token_fusion_kl", teachers=["a", "b"], mode="dynamic", temperature=2.0)({"logits": s}, batch)
    assert torch.isfinite(loss) and float(loss) > 0
    assert float(parts["w_a"]) + float(parts["w_b"]) == pytest.approx(1.0, abs=1e-5)
    assert float(parts["tokens"]) == 5 + 3  # next-token pairs of real tokens: 6 real tokens in row 0, 4 in row 1
    for tid in ("a", "b"):  # a fusion of two different teachers is neither of them
        assert (
            abs(float(loss) - float(_loss("forward_kl", teacher=tid, temperature=2.0)({"logits": s}, batch)[0])) > 1e-3
        )
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert s.grad[1, 4:].abs().sum() == 0  # padding gets no gradient


def test_bad_fusion_settings_are_refused_with_the_fix() -> None:
    with pytest.raises(ValidationError, match="needs `weights:`"):
        _loss("token_fusion_kl", teachers=["a", "b"], mode="static")
    with pytest.raises(ValidationError, match="at least 2"):
        _loss("token_fusion_kl", teachers=["a"])
    with pytest.raises(ValueError, match=r"unknown teacher\(s\) \['c'\]"):
        _loss("token_fusion_kl", teachers=["a", "c"])
    batch, s = _batch(3)
    batch["b.input_ids"] = batch["b.input_ids"] + 1
    with pytest.raises(ValueError, match="tokenised the same rows differently"):
        _loss("token_fusion_kl", teachers=["a", "b"])({"logits": s}, batch)


def test_a_spec_that_fuses_a_teacher_without_per_token_outputs_is_refused_at_load() -> None:
    from kdpipe.config import SpecError, load_spec

    lm = {
        "kind": "hf_causal_lm",
        "params": {
            "max_length": 48,
            "pretrain": {"layers": 2, "hidden": 64, "heads": 2, "intermediate": 128, "steps": 10},
        },
        "topk": 16,
    }
    with pytest.raises(
        SpecError,
        match=r"losses\[1\] \(token_fusion_kl\) reads teacher 'b' outputs \['tokens', 'topk'\]; add \['topk'\]",
    ):
        load_spec(
            "pipelines/lm_distill.yaml",
            {
                "teachers": [
                    {"id": "a", **lm, "outputs": ["tokens", "topk"]},
                    {"id": "b", **lm, "outputs": ["tokens"]},
                ],
                "student.params": {"tokens_from": "a", "num_layers": 1},
                "losses": [{"name": "lm_ce"}, {"name": "token_fusion_kl", "teachers": ["a", "b"]}],
            },
        )
