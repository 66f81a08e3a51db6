"""Causal-LM building blocks without Ray: the gloss corpus, one-time teacher pretraining, the
hf_causal_lm teacher adapter (top-k log-probs + tail, padded vocabularies, vocabulary checks) and
the causal_lm student (shapes, init from teacher blocks, save_hf -> from_pretrained -> generate)."""

from __future__ import annotations

import json
import logging
import math
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kdpipe.config import StudentConfig, TeacherConfig, check_student, check_teacher
from kdpipe.errors import KdpipeError
from kdpipe.lm.corpus import (
    CorpusSplit,
    default_tokenizer,
    encode_texts,
    load_glosses,
    pack_texts,
    split_of,
    token_lists,
)
from kdpipe.lm.pretrain import PretrainRecipe, pretrain, pretrained_dir
from kdpipe.losses import vocabulary_bound
from students.causal_lm import CausalLMStudent
from teachers.hf_causal_lm import HFCausalLMTeacher, check_vocab_compatible, model_dir, topk_logprobs

TEXTS = [
    "a domesticated carnivorous mammal that typically has a long snout",
    "move fast by using one's feet",
    (
        "the quality of being honest and telling the truth about what happened to the small animals of the "
        "forest during the long cold winter that followed the great storm"
    ),  # longer than max_length: truncated
    "hi",
]
MAX_LEN = 24
K = 8


@pytest.fixture(scope="module")
def tok() -> Any:
    return default_tokenizer()


def save_tiny_llama(path: Path, tok: Any, vocab: int | None = None, layers: int = 2, seed: int = 0) -> Any:
    """A random 32-wide Llama + the default tokenizer as a HF directory. The final norm is scaled
    up so the next-token distributions are peaked (no near-ties in the top-k)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab or len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=vocab is None,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.norm.weight.fill_(40.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory, tok: Any) -> Path:
    d = tmp_path_factory.mktemp("tiny_llama")
    save_tiny_llama(d, tok)
    return d


def teacher_cfg(path: Path | None, **params: Any) -> TeacherConfig:
    """A teacher as a spec declares it, checked by its kind (`kdpipe.config.check_teacher`)."""
    outputs = ["tokens", "topk"] + (["hidden"] if params.get("hidden_layers") else [])
    return check_teacher(
        TeacherConfig(
            id="lm",
            kind="hf_causal_lm",
            path=str(path) if path else None,
            outputs=outputs,
            topk=K,
            params={"max_length": MAX_LEN, **params},
        ),
        ".kdpipe",
    )


def reference_logp(model_path: Path, ids: np.ndarray, mask: np.ndarray, vocab: int) -> tuple[torch.Tensor, Any]:
    """The model's own log-softmax (float64) over the first `vocab` logits, on the whole batch at once."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids).long(),
            attention_mask=torch.from_numpy(mask).long(),
            output_hidden_states=True,
        )
    return torch.log_softmax(out.logits[..., :vocab].double(), -1), out


# ------------------------------------------------------------------ teacher adapter


def test_teacher_topk_equals_model_log_softmax(teacher_dir: Path, tok: Any) -> None:
    teacher = HFCausalLMTeacher.load(teacher_cfg(teacher_dir, hidden_layers=[0, 2]))
    out = teacher.forward({"text": TEXTS})
    n = len(TEXTS)
    assert out["input_ids"].shape == (n, MAX_LEN) and out["input_ids"].dtype == np.int32
    assert out["attention_mask"].shape == (n, MAX_LEN)
    assert out["topk_ids"].shape == (n, MAX_LEN, K) and out["topk_ids"].dtype == np.int32
    assert out["topk_logp"].shape == (n, MAX_LEN, K) and out["topk_logp"].dtype == np.float32
    assert out["tail_logp"].shape == (n, MAX_LEN) and out["tail_logp"].dtype == np.float32
    assert out["hidden.2"].shape == (n, MAX_LEN, 32) and out["hidden.2"].dtype == np.float16

    # tokens: [bos] text [eos], truncated (no eos) or right-padded; mask marks exactly the real tokens
    ids, mask = out["input_ids"], out["attention_mask"].astype(bool)
    for i, row in enumerate(token_lists(tok, TEXTS, add_eos=False)):
        real = min(len(row) + 1, MAX_LEN)
        assert mask[i].sum() == real and mask[i, :real].all()
        assert ids[i, 0] == tok.bos_token_id and list(ids[i, : min(len(row), MAX_LEN)]) == row[:MAX_LEN]
        if len(row) < MAX_LEN:
            assert ids[i, real - 1] == tok.eos_token_id and (ids[i, real:] == tok.pad_token_id).all()
    assert mask[2].all() and tok.eos_token_id not in ids[2]  # the long text: truncated, no EOS

    logp, ref = reference_logp(teacher_dir, ids, out["attention_mask"], len(tok))
    want_vals, _ = torch.topk(logp, K, dim=-1)
    got_vals = torch.from_numpy(out["topk_logp"]).double()
    got_ids = torch.from_numpy(out["topk_ids"]).long()
    m = torch.from_numpy(mask)
    assert (want_vals[:, :, 0] - want_vals[:, :, -1])[m].min() > 0.5, "peaked distributions expected"
    torch.testing.assert_close(got_vals[m], want_vals[m], atol=2e-4, rtol=0)
    # the ids are the tokens with those log-probs (robust to ties), sorted descending, distinct
    torch.testing.assert_close(logp.gather(-1, got_ids)[m], got_vals[m], atol=2e-4, rtol=0)
    assert (got_vals[m][:, :-1] >= got_vals[m][:, 1:]).all()
    assert all(len(set(r.tolist())) == K for r in got_ids[m])
    # tail = log(1 - sum of the top-k probabilities), in float64 from the model's logits
    want_tail = torch.log1p(-torch.exp(want_vals).sum(-1))
    torch.testing.assert_close(torch.from_numpy(out["tail_logp"]).double()[m], want_tail[m], atol=1e-4, rtol=1e-4)
    # padding positions hold zeros
    assert (
        (out["topk_logp"][~mask] == 0).all()
        and (out["topk_ids"][~mask] == 0).all()
        and (out["tail_logp"][~mask] == 0).all()
    )
    # hidden states of the chosen layers, at real tokens
    for layer in (0, 2):
        want_h = ref.hidden_states[layer].numpy().astype(np.float16)
        np.testing.assert_allclose(
            out[f"hidden.{layer}"][mask].astype(np.float32), want_h[mask].astype(np.float32), atol=2e-2, rtol=1e-2
        )
        assert (out[f"hidden.{layer}"][~mask] == 0).all()


def test_teacher_row_chunking_does_not_change_outputs(teacher_dir: Path) -> None:
    one_row = HFCausalLMTeacher.load(teacher_cfg(teacher_dir, logits_budget_mb=0.01))
    all_rows = HFCausalLMTeacher.load(teacher_cfg(teacher_dir, logits_budget_mb=4096))
    assert one_row.rows_per_chunk(MAX_LEN) == 1 and all_rows.rows_per_chunk(MAX_LEN) == 32
    a, b = one_row.forward({"text": TEXTS}), all_rows.forward({"text": TEXTS})
    for key in ("input_ids", "attention_mask", "topk_ids"):
        np.testing.assert_array_equal(a[key], b[key])
    np.testing.assert_allclose(a["topk_logp"], b["topk_logp"], atol=2e-4)
    np.testing.assert_allclose(a["tail_logp"], b["tail_logp"], atol=2e-4)


def test_topk_logprobs_tail_is_exact_and_minus_inf_when_k_covers_vocab() -> None:
    logits = torch.tensor([[8.0, 1.0, 0.5, -2.0, 3.0]])
    vals, idx, tail = topk_logprobs(logits, 2)
    p = torch.softmax(logits, -1)
    assert idx.tolist() == [[0, 4]]
    torch.testing.assert_close(vals, torch.log(p[:, [0, 4]]))
    torch.testing.assert_close(tail, torch.log(p[:, [1, 2, 3]].sum(-1)))
    _, _, full = topk_logprobs(logits, 5)
    assert torch.isneginf(full).all()


def test_padded_vocab_is_cut_to_the_tokenizer(tmp_path: Path, tok: Any, caplog: pytest.LogCaptureFixture) -> None:
    padded = len(tok) + 2048  # output rows past the tokenizer's ids, as Qwen's 152,064 for 151,936
    save_tiny_llama(tmp_path, tok, vocab=padded)
    with caplog.at_level(logging.INFO, logger="kdpipe.teachers.hf_causal_lm"):
        teacher = HFCausalLMTeacher.load(teacher_cfg(tmp_path))
    lines = [r.getMessage() for r in caplog.records if "cut" in r.getMessage()]
    assert len(lines) == 1 and str(padded) in lines[0] and str(len(tok)) in lines[0]
    out = teacher.forward({"text": TEXTS})
    mask = out["attention_mask"].astype(bool)
    assert out["topk_ids"][mask].max() < len(tok)
    cut, _ = reference_logp(tmp_path, out["input_ids"], out["attention_mask"], len(tok))
    full, _ = reference_logp(tmp_path, out["input_ids"], out["attention_mask"], padded)
    assert (full.argmax(-1)[torch.from_numpy(mask)] >= len(tok)).any(), (
        "padded rows must compete, or the test proves nothing"
    )
    got = torch.from_numpy(out["topk_logp"]).double()[torch.from_numpy(mask)]
    torch.testing.assert_close(got, torch.topk(cut, K, -1).values[torch.from_numpy(mask)], atol=2e-4, rtol=0)
    # exp(top-k) + exp(tail) is the whole distribution over the tokenizer's ids
    total = np.exp(out["topk_logp"][mask].astype(np.float64)).sum(-1) + np.exp(
        out["tail_logp"][mask].astype(np.float64)
    )
    np.testing.assert_allclose(total, 1.0, atol=1e-5)


def other_tokenizer(path: Path) -> Path:
    """A small word-level tokenizer: another vocabulary (different sizes and tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "dog", "cat", "Ġthe", "run", "fast", "tree"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(path)
    return path


def test_check_vocab_compatible(teacher_dir: Path, tmp_path: Path, tok: Any) -> None:
    assert check_vocab_compatible(teacher_dir, tok, vocabulary_bound([{"name": n} for n in ["kd"]])) is True
    assert (
        check_vocab_compatible(teacher_dir, teacher_dir, vocabulary_bound([{"name": n} for n in ["kd", "ce"]])) is True
    )
    other = other_tokenizer(tmp_path / "other")
    with pytest.raises(ValueError) as e:
        check_vocab_compatible(teacher_dir, other, vocabulary_bound([{"name": n} for n in ["kd"]]))
    msg = str(e.value)
    assert str(teacher_dir) in msg and str(other) in msg  # both vocabularies named
    assert f"{len(tok)} tokens" in msg and "10 tokens" in msg  # with their sizes
    assert "[PAD]" in msg and "<s>" in msg and "uld" in msg  # a sample of differing tokens, and the way out
    assert check_vocab_compatible(teacher_dir, other, vocabulary_bound([{"name": n} for n in ["uld"]])) is False
    assert (
        check_vocab_compatible(teacher_dir, str(other), vocabulary_bound([{"name": n} for n in ["uld", "lm_ce"]]))
        is False
    )
    with pytest.raises(ValueError, match="'kd'"):
        check_vocab_compatible(teacher_dir, other, vocabulary_bound([{"name": n} for n in ["uld", "kd"]]))


def test_teacher_config_checks(teacher_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="topk"):
        check_teacher(TeacherConfig(id="lm", kind="hf_causal_lm", path=str(teacher_dir), outputs=["logits"]), ".kdpipe")
    with pytest.raises(ValueError, match="hidden_layers"):
        check_teacher(
            TeacherConfig(id="lm", kind="hf_causal_lm", path=str(teacher_dir), outputs=["tokens", "hidden"]), ".kdpipe"
        )
    with pytest.raises(ValueError, match=r"layers 0\.\.2"):
        teacher_cfg(teacher_dir, hidden_layers=[3])
    with pytest.raises(ValueError, match="config.json"):
        teacher_cfg(tmp_path / "missing")
    with pytest.raises(ValueError, match="params.pretrain"):
        teacher_cfg(None)


# ------------------------------------------------------------------ student


def test_student_shapes_and_init_from_teacher_layers(teacher_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from kdpipe.train import StudentMeta, build_student

    params = StudentConfig(
        kind="causal_lm",
        params={
            "tokens_from": "lm",
            "teacher_path": str(teacher_dir),
            "num_layers": 2,
            "init_from_teacher_layers": [1, 0],
            "output_hidden_states": True,
        },
    ).params
    student = build_student("causal_lm", params, StudentMeta(None, 0, ["lm"], {}))
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, local_files_only=True)
    for s_block, t_block in ((0, 1), (1, 0)):
        s_state = student.hf_model.model.layers[s_block].state_dict()
        t_state = teacher.model.layers[t_block].state_dict()
        assert s_state.keys() == t_state.keys()
        for k in t_state:
            assert torch.equal(s_state[k], t_state[k]), (s_block, k)
    assert torch.equal(student.hf_model.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    assert torch.equal(student.hf_model.model.norm.weight, teacher.model.norm.weight)

    ids = torch.tensor([[101, 1037, 3899, 102, 0, 0], [101, 2693, 3435, 2011, 2478, 102]])
    out = student({"lm.input_ids": ids, "lm.attention_mask": (ids != 0).long()})
    assert out["logits"].shape == (2, 6, teacher.config.vocab_size)
    assert [h.shape for h in out["hidden_states"]] == [(2, 6, 32)] * 3
    # same blocks and embeddings in the same order as the teacher -> the teacher's own logits
    same = CausalLMStudent(
        tokens_from="lm", teacher_path=str(teacher_dir), num_layers=2, init_from_teacher_layers=[0, 1]
    )
    with torch.no_grad():
        want = teacher(input_ids=ids, attention_mask=(ids != 0).long()).logits
        got = same({"lm.input_ids": ids, "lm.attention_mask": (ids != 0).long()})["logits"]
    torch.testing.assert_close(got, want)


def test_narrow_student(teacher_dir: Path) -> None:
    with pytest.raises(ValueError, match="teacher's width"):
        CausalLMStudent(
            tokens_from="lm",
            teacher_path=str(teacher_dir),
            num_layers=1,
            hidden_size=16,
            heads=2,
            init_from_teacher_layers=[0],
        )
    narrow = CausalLMStudent(tokens_from="lm", teacher_path=str(teacher_dir), num_layers=1, hidden_size=16, heads=2)
    assert narrow.hf_model.config.hidden_size == 16 and narrow.hf_model.config.head_dim == 8
    from transformers import AutoModelForCausalLM

    t_emb = AutoModelForCausalLM.from_pretrained(teacher_dir, local_files_only=True).get_input_embeddings().weight
    s_emb = narrow.hf_model.get_input_embeddings().weight
    # PCA projection: the student's table is the centred teacher table on its top-16 directions,
    # so its pairwise inner products keep most of the teacher's (centred) variance
    centred = t_emb - t_emb.mean(0, keepdim=True)
    assert s_emb.shape == (t_emb.shape[0], 16)
    assert s_emb.pow(2).sum() > 0.5 * centred.pow(2).sum()
    with pytest.raises(ValueError, match="one per student block"):
        check_student(
            StudentConfig(
                kind="causal_lm",
                params={
                    "tokens_from": "lm",
                    "teacher_path": str(teacher_dir),
                    "num_layers": 2,
                    "init_from_teacher_layers": [0],
                },
            )
        )


def test_student_save_hf_loads_and_generates(teacher_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    student = CausalLMStudent(
        tokens_from="lm", teacher_path=str(teacher_dir), num_layers=1, init_from_teacher_layers=[1]
    ).eval()
    d = student.save_hf(tmp_path / "student")
    loaded = AutoModelForCausalLM.from_pretrained(d, local_files_only=True).eval()
    ids = torch.tensor([[101, 1037, 3899, 11286]])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids).logits,
            student({"lm.input_ids": ids, "lm.attention_mask": torch.ones_like(ids)})["logits"],
        )
    tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("[CLS]", "[SEP]", "[PAD]")
    assert tok("a dog")["input_ids"] == [101, 1037, 3899]  # BOS only: a prompt must not end in EOS
    gen = pipeline("text-generation", model=str(d), device="cpu")
    res = gen("a dog", max_new_tokens=6, min_new_tokens=6, do_sample=False, return_full_text=False)
    assert len(res[0]["generated_text"].split()) >= 1


def test_student_without_teacher_uses_default_tokenizer() -> None:
    s = CausalLMStudent(tokens_from="lm", num_layers=1, hidden_size=32, heads=2)
    assert s.hf_model.config.vocab_size == 30522 and s.hf_model.config.model_type == "llama"
    assert s.hf_model.config.eos_token_id == 102


# ------------------------------------------------------------------ corpus and pretraining


def test_corpus_split_domains_and_packing(tok: Any) -> None:
    train, held = load_glosses("train"), load_glosses("heldout")
    assert len(train) > 60_000 and len(held) > 40_000
    assert not set(train) & set(held)
    frac = len(held) / (len(train) + len(held))
    assert abs(frac - 0.40) < 0.01  # val 0.15 + test 0.25, the defaults of source.split
    assert all(split_of(t, CorpusSplit()) == "train" for t in train[:200])
    wider = load_glosses("train", corpus_split=CorpusSplit(val=0.3, test=0.3))
    assert set(wider) < set(train)  # a larger held-out share only removes train glosses
    nouns, verbs = load_glosses("train", "noun"), load_glosses("train", "verb")
    assert nouns and verbs and not set(nouns) & set(verbs)
    assert (
        load_glosses("train", limit=100) == load_glosses("train", limit=100)
        and len(load_glosses("train", limit=100)) == 100
    )
    packed = pack_texts(tok, train[:50], 16)
    stream = [t for r in token_lists(tok, train[:50]) for t in r]
    assert packed.shape[1] == 16 and packed.ravel().tolist() == stream[: packed.size]
    assert packed[0, 0] == tok.bos_token_id and (packed == tok.eos_token_id).sum() >= 10
    enc = encode_texts(tok, train[:3], 8, pad_to_max=False)
    assert enc.input_ids.shape[1] <= 8 and enc.attention_mask.dtype == np.int64
    with pytest.raises(ValueError, match="domain"):
        load_glosses("train", "nouns")


TINY = {
    "layers": 1,
    "hidden": 32,
    "heads": 2,
    "intermediate": 64,
    "max_length": 32,
    "steps": 25,
    "batch_size": 8,
    "lr": 1e-2,
    "warmup_steps": 2,
    "limit": 300,
    "eval_glosses": 40,
}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("pretrained")
    return root, pretrain(PretrainRecipe(**TINY), root=root)


def test_pretrain_trains_once_and_saves_a_hf_model(pretrained: Any, tok: Any) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, res = pretrained
    assert res.trained and res.path == pretrained_dir(PretrainRecipe(**TINY), root)
    losses = res.report["losses"]
    assert len(losses) == TINY["steps"]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0  # it learned
    assert math.isfinite(res.report["heldout_ppl"]) and math.isfinite(res.report["unigram_ppl"])
    model = AutoModelForCausalLM.from_pretrained(res.path, local_files_only=True)
    assert model.config.num_hidden_layers == 1 and model.config.vocab_size == len(tok)
    t = AutoTokenizer.from_pretrained(res.path, local_files_only=True)
    assert t.get_vocab() == tok.get_vocab() and t.eos_token_id == model.config.eos_token_id == 102

    weights = Path(res.path) / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = pretrain(PretrainRecipe(**TINY), root=root)
    assert not again.trained and again.path == res.path and weights.stat().st_mtime_ns == stamp
    assert again.report["losses"] == losses
    assert pretrained_dir(PretrainRecipe(**{**TINY, "seed": 1}), root) != res.path  # the recipe names the directory
    with pytest.raises(KdpipeError, match="another recipe"):
        pretrain(PretrainRecipe(**{**TINY, "steps": 26}), out_dir=res.path)


def test_teacher_prepare_pretrains_then_teaches(pretrained: Any) -> None:
    root, res = pretrained
    cfg = teacher_cfg(None, pretrain=TINY, pretrain_root=str(root))
    assert model_dir(cfg) == res.path
    source = types.SimpleNamespace(
        input_kind="text",
        split={"salt": "kdpipe", "val": 0.15, "test": 0.25},
        cfg=types.SimpleNamespace(kind="wordnet"),
    )
    stamp = (Path(res.path) / "model.safetensors").stat().st_mtime_ns
    HFCausalLMTeacher.prepare(cfg, source, str(root))  # reuses the fixture's run
    assert (Path(res.path) / "model.safetensors").stat().st_mtime_ns == stamp
    digest = HFCausalLMTeacher.weights_digest(cfg)
    assert len(digest) == 16 and digest == HFCausalLMTeacher.weights_digest(cfg)
    out = HFCausalLMTeacher.load(cfg).forward({"text": TEXTS[:2]})
    assert out["topk_ids"].shape == (2, MAX_LEN, K)
    leaky = types.SimpleNamespace(
        input_kind="text", split={"salt": "kdpipe", "val": 0.3, "test": 0.25}, cfg=types.SimpleNamespace(kind="wordnet")
    )
    with pytest.raises(ValueError, match="would train on rows"):
        HFCausalLMTeacher.prepare(cfg, leaky, str(root))
    report = json.loads((Path(res.path) / "kdpipe_pretrain.json").read_text())
    assert report["digest"] == res.digest
