"""A Hugging Face causal-LM teacher: per-token top-k log-probs (with the tail mass) of any local
`AutoModelForCausalLM` directory, or of a small Llama pretrained once on WordNet glosses.

The model comes from `path:` (a saved `from_pretrained` directory; nothing is downloaded,
``local_files_only``; `trust_remote_code` only when the teacher's spec sets it), or, with
``params.pretrain: {recipe}``, from `kdpipe.lm.pretrain`: `prepare` trains it the first time
(into `path:` when given, else ``<pretrain_root>/lm-<digest>``) and every later run reuses it.

Tokenisation runs inside the teach actor: ``[bos] text [eos]`` (the tokenizer's own special
tokens, EOS appended when `add_eos`), truncated to `max_length`, right-padded to `max_length`
so every output is a fixed-size cache column. Outputs of `forward` (numpy, N rows, L = max_length):

  input_ids       (N, L)     int32   token ids (pad id at padding)
  attention_mask  (N, L)     int32   1 = real token
  topk_ids        (N, L, k)  int32   the k most likely next tokens after position t, most likely first
  topk_logp       (N, L, k)  float32 their log-probs at T = 1, sorted descending
  tail_logp       (N, L)     float32 log of the probability mass outside the top-k (-inf when k ≥ V)
  hidden.<l>      (N, L, H)  float16 hidden state after block l (0 = embeddings), for `params.hidden_layers`

Position t holds the distribution of token t + 1, so a loss pairs ``topk_*[:, :-1]`` with
``input_ids[:, 1:]`` and ``attention_mask[:, 1:]``; the last real position (EOS) predicts past the
text. Padding positions hold zeros. The log-softmax runs over at most `logits_budget_mb` of
logits at a time (rows are chunked), never over the whole (N, L, V) batch.

Vocabularies: a model whose output layer has more rows than its tokenizer has ids (embeddings
padded to a multiple, e.g. 152,064 rows for 151,936 ids) gets its logits cut to the tokenizer's
ids before the softmax (logged once). `check_vocab_compatible` tells a spec whose student uses
another tokenizer that only `uld` can distil across vocabularies.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from kdpipe import storage, weights
from kdpipe.lm.corpus import check_holdout, encode_texts
from kdpipe.lm.pretrain import DEFAULT_ROOT, PretrainRecipe, is_pretrained, pretrain, pretrained_dir
from teachers import TEACHERS
from teachers.base import Teacher, digest_dir

if TYPE_CHECKING:
    from kdpipe.data import SourceData
    from kdpipe.spec import TeacherConfig

log = logging.getLogger("kdpipe.teachers.hf_causal_lm")

SUPPORTED_OUTPUTS = {"tokens", "topk", "hidden"}
WEIGHT_FILES = ("*.safetensors", "*.json", "*.bin", "*.txt", "*.model", "*.py")  # *.py: remote code changes outputs too
DEFAULT_TOPK = 64


class HFCausalLMParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_length: int = Field(
        64, ge=2, le=8192, description="tokens per row (truncate/pad): the width of per-token columns"
    )
    add_eos: bool = Field(
        True,
        description="append the tokenizer's EOS to every text (as pretraining did), so the "
        "teacher also teaches where a text ends",
    )
    hidden_layers: list[int] = Field(
        default_factory=list,
        description="hidden states cached as hidden.<l> (0 = embeddings) when outputs include 'hidden'",
    )
    batch_size: int = Field(32, ge=1, description="rows per forward pass inside an actor (before budget chunking)")
    logits_budget_mb: float = Field(
        256.0, gt=0, description="bound on the logits held at once: rows per chunk = budget / (2 · L · V · 4 bytes)"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights dtype: auto = float32 on CPU, bfloat16 on CUDA (float16 where bf16 is unsupported)"
    )
    pretrain: PretrainRecipe | None = Field(
        None,
        description="train this recipe once with kdpipe.lm.pretrain (into "
        "`path:` when set, else <pretrain_root>/lm-<digest>)",
    )
    pretrain_root: str | None = Field(
        None, description="where recipe-named pretrained teachers live (default: <storage>/teachers)"
    )


def _params(cfg: TeacherConfig) -> HFCausalLMParams:
    return HFCausalLMParams(**cfg.params)


def model_dir(cfg: TeacherConfig) -> str:
    """The teacher's directory (a path or a URI): `path:`, else the pretraining recipe's digest directory."""
    p = _params(cfg)
    if cfg.path:
        return cfg.path
    if p.pretrain is None:
        raise ValueError(
            f"teacher '{cfg.id}' (hf_causal_lm): set `path:` (a Hugging Face causal-LM directory) "
            "or `params.pretrain:` (a recipe to pretrain a small Llama on WordNet glosses)"
        )
    return pretrained_dir(p.pretrain, p.pretrain_root or DEFAULT_ROOT)


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """fp32 on CPU (this CPU has no bf16 units); bf16 on CUDA when supported, else fp16."""
    if name != "auto":
        return getattr(torch, name)
    if not device.startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def output_rows(model: Any) -> int:
    """Rows of the model's output layer (its logits' width), which may exceed the tokenizer's ids."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


@TEACHERS.register("hf_causal_lm")
class HFCausalLMTeacher(Teacher):
    Params = HFCausalLMParams
    input_kind = "text"
    parquet_options = {"compression": "zstd", "use_dictionary": False, "write_statistics": False}  # see topk_codec
    model_dir = staticmethod(model_dir)
    supported_outputs = SUPPORTED_OUTPUTS

    @classmethod
    def default_path(cls, cfg: TeacherConfig, storage_root: str) -> str | None:
        p = _params(cfg)
        if p.pretrain is None:
            return None
        return pretrained_dir(p.pretrain, p.pretrain_root or storage.Layout(storage_root).teachers)

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        params: HFCausalLMParams,
        outputs: list[str],
        topk: int,
        device: str,
        name: str = "hf_causal_lm",
    ) -> None:
        self.model = model.eval().to(device)
        self.tok = tokenizer
        self.p = params
        self.outputs = outputs
        self.device = device
        self.vocab = len(tokenizer)
        rows = output_rows(self.model)
        if rows < self.vocab:
            raise ValueError(
                f"teacher '{name}': its output layer scores {rows} tokens but its tokenizer has {self.vocab} "
                "ids; the tokenizer does not belong to this model"
            )
        if rows > self.vocab:
            log.info(
                "teacher '%s': output layer has %d rows, tokenizer %d ids; logits cut to the tokenizer's %d ids "
                "before the softmax",
                name,
                rows,
                self.vocab,
                self.vocab,
            )
        self.k = min(topk, self.vocab)
        log.info("teacher '%s' on %s in %s", name, device, next(self.model.parameters()).dtype)

    @classmethod
    def check_config(cls, cfg: TeacherConfig) -> None:
        p = _params(cfg)
        bad = sorted(set(cfg.outputs) - SUPPORTED_OUTPUTS)
        if bad:
            raise ValueError(
                f"teacher kind hf_causal_lm cannot produce outputs {bad}; choose from {sorted(SUPPORTED_OUTPUTS)} "
                "(dense 'logits' would cost V × 4 bytes per token: cache 'topk' instead)"
            )
        if "hidden" in cfg.outputs and not p.hidden_layers:
            raise ValueError(
                "outputs include 'hidden': set params.hidden_layers (hidden-state layers to cache, 0 = embeddings)"
            )
        loc = model_dir(cfg)
        if storage.is_remote(loc):  # read where the teacher is fetched (once per node), not at spec time
            return
        d = Path(loc)
        if p.pretrain is None and not (d / "config.json").is_file():
            raise ValueError(
                f"teacher '{cfg.id}': path '{d}' is not a Hugging Face model directory (no config.json); point "
                "`path:` at a saved causal LM or set params.pretrain to train one"
            )
        if (d / "config.json").is_file():
            n_layers = json.loads((d / "config.json").read_text()).get("num_hidden_layers")
        else:
            n_layers = p.pretrain.layers if p.pretrain else None
        if n_layers is not None and any(not 0 <= l <= n_layers for l in p.hidden_layers):
            raise ValueError(
                f"params.hidden_layers {p.hidden_layers}: this model has layers 0..{n_layers} (0 = embeddings)"
            )

    @classmethod
    def prepare(cls, cfg: TeacherConfig, source: SourceData, storage_root: str) -> TeacherConfig:
        """Pretrain the recipe's teacher if it does not exist yet (driver side, once)."""
        if source.input_kind != "text":
            raise ValueError(
                f"teacher '{cfg.id}' (hf_causal_lm) needs a text source (source.text or kind text/wordnet)"
            )
        p = _params(cfg)
        cfg = cls.resolve(cfg, source, storage_root)
        if p.pretrain is not None:
            check_holdout(cfg.id, "params.pretrain.split", p.pretrain.split, source)
            pretrain(p.pretrain, out_dir=cfg.path)
        return cfg

    @classmethod
    def resolve(cls, cfg: TeacherConfig, source: SourceData, storage_root: str) -> TeacherConfig:
        return cfg if cfg.path else cfg.model_copy(update={"path": cls.default_path(cfg, storage_root)})

    @classmethod
    def weights_digest(cls, cfg: TeacherConfig) -> str:
        return digest_dir(model_dir(cfg), WEIGHT_FILES)

    @classmethod
    def load(cls, cfg: TeacherConfig, device: str = "cpu") -> HFCausalLMTeacher:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        d = Path(model_dir(cfg))  # local: the actor fetched a remote directory to this node first
        p = _params(cfg)
        if p.pretrain is not None and not is_pretrained(d):
            raise FileNotFoundError(
                f"teacher '{cfg.id}': no pretrained teacher at {d}; run `kdpipe teach SPEC` to train it"
            )
        tok = AutoTokenizer.from_pretrained(d, local_files_only=True, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            d, local_files_only=True, trust_remote_code=cfg.trust_remote_code, dtype=resolve_dtype(p.dtype, device)
        )
        return cls(model, tok, p, list(cfg.outputs), cfg.topk or DEFAULT_TOPK, device, cfg.id)

    # ---------------------------------------------------------------- forward

    def rows_per_chunk(self, length: int) -> int:
        """Rows whose fp32 logits and log-probs (2 · length · V · 4 bytes each) fit the budget."""
        per_row = 2 * length * output_rows(self.model) * 4
        return max(1, min(self.p.batch_size, int(self.p.logits_budget_mb * 2**20 // per_row)))

    @torch.no_grad()
    def forward(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        """{"text": list[str]} -> the per-token outputs listed in the module doc."""
        texts = [str(t) for t in batch["text"]]
        enc = encode_texts(self.tok, texts, self.p.max_length, self.p.add_eos)
        n, length = enc.input_ids.shape
        res = {
            "input_ids": enc.input_ids.astype(np.int32),
            "attention_mask": enc.attention_mask.astype(np.int32),
            "topk_ids": np.zeros((n, length, self.k), np.int32),
            "topk_logp": np.zeros((n, length, self.k), np.float32),
            "tail_logp": np.zeros((n, length), np.float32),
        }
        layers = self.p.hidden_layers if "hidden" in self.outputs else []
        hidden_size = int(self.model.config.hidden_size)
        for l in layers:
            res[f"hidden.{l}"] = np.zeros((n, length, hidden_size), np.float16)
        step = self.rows_per_chunk(length)
        for i in range(0, n, step):
            self._forward_rows(enc.input_ids[i : i + step], enc.attention_mask[i : i + step], layers, res, i)
        return res

    def _forward_rows(
        self, ids: np.ndarray, mask: np.ndarray, layers: list[int], res: dict[str, np.ndarray], start: int
    ) -> None:
        """One chunk of rows, run only up to its longest real row (right padding), written into `res`."""
        width = max(1, int(mask.sum(1).max()))
        x = torch.from_numpy(ids[:, :width]).to(self.device)
        m = torch.from_numpy(mask[:, :width]).to(self.device)
        out = self.model(input_ids=x, attention_mask=m, output_hidden_states=bool(layers), use_cache=False)
        logits = out.logits[..., : self.vocab]  # padded output rows are no tokens
        vals, idx, tail = topk_logprobs(logits, self.k)
        real = mask[:, :width].astype(bool)
        rows = slice(start, start + len(ids))
        res["topk_ids"][rows, :width] = np.where(real[..., None], idx.cpu().numpy(), 0)
        res["topk_logp"][rows, :width] = np.where(real[..., None], vals.cpu().numpy(), 0)
        res["tail_logp"][rows, :width] = np.where(real, tail.cpu().numpy(), 0)
        for l in layers:
            h = out.hidden_states[l].float().cpu().numpy()
            res[f"hidden.{l}"][rows, :width] = np.where(real[..., None], h, 0).astype(np.float16)


def topk_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(..., V) logits -> top-k log-probs (..., k) float32 sorted descending, their ids (..., k)
    int32, and the log of the mass outside them (...) float32 (-inf when k covers V).

    The tail is a log-sum-exp over the log-probs with the top-k masked out, not log(1 − Σ p_topk),
    which loses every digit when the top-k holds nearly all the mass."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    vals, idx = torch.topk(logp, k, dim=-1, sorted=True)
    if k >= logp.shape[-1]:
        tail = torch.full(logp.shape[:-1], float("-inf"), device=logp.device)
    else:
        tail = logp.scatter_(-1, idx, float("-inf")).logsumexp(-1)  # in place: logp is not used after this
    return vals, idx.to(torch.int32), tail


# ---------------------------------------------------------------- vocabularies


def _load_tokenizer(obj: Any) -> Any:
    if hasattr(obj, "get_vocab"):
        return obj
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(weights.local_copy(str(obj)), local_files_only=True)


def check_vocab_compatible(teacher_dir: str | Path, student_tokenizer_or_dir: Any, id_losses: list[str]) -> bool:
    """True when teacher and student tokenizers share one vocabulary (same token -> id map).

    `id_losses` are the spec's losses that compare the two distributions id by id
    (`kdpipe.losses.vocabulary_bound`): when the vocabularies differ and there is one, this raises
    ValueError naming both vocabularies (sizes, a sample of the differing tokens); cross-tokenizer
    losses (`uld`) and losses that read no teacher are fine. Returns False when they differ and
    nothing compares ids."""
    t_tok = _load_tokenizer(teacher_dir)
    s_tok = _load_tokenizer(student_tokenizer_or_dir)
    tv, sv = t_tok.get_vocab(), s_tok.get_vocab()
    if tv == sv:
        return True
    blocking = sorted(set(id_losses))
    if not blocking:
        return False
    s_name = getattr(s_tok, "name_or_path", None) or str(student_tokenizer_or_dir)
    raise ValueError(
        f"teacher and student vocabularies differ: teacher {teacher_dir} has {len(tv)} tokens "
        f"({type(t_tok).__name__}), student {s_name} has {len(sv)} tokens ({type(s_tok).__name__}); "
        f"{describe_vocab_diff(tv, sv)}. Losses {blocking} compare the two distributions id by id, which is only "
        "meaningful over one vocabulary: give the student the teacher's tokenizer (student.params.teacher_path), "
        "or distil across tokenizers with the `uld` loss"
    )


def describe_vocab_diff(teacher: dict[str, int], student: dict[str, int], n: int = 5) -> str:
    """A short sample of what differs: tokens only in one vocabulary, and tokens with other ids."""
    only_t = sorted(set(teacher) - set(student), key=teacher.get)[:n]
    only_s = sorted(set(student) - set(teacher), key=student.get)[:n]
    moved = sorted((t for t in set(teacher) & set(student) if teacher[t] != student[t]), key=teacher.get)[:n]
    parts = []
    if only_t:
        parts.append(f"only in the teacher's: {only_t}")
    if only_s:
        parts.append(f"only in the student's: {only_s}")
    if moved:
        parts.append("same token, other id: " + ", ".join(f"{t!r} {teacher[t]}->{student[t]}" for t in moved))
    return "; ".join(parts) or "same tokens"
