"""Compressed token-level top-k cache (kdpipe.lm.topk_codec): exact ids, bounded values, tail mass,
edge cases, clear errors, and a size budget that fails if the format grows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdpipe.lm import topk_codec as codec

V = 30522


def zipf_topk(t: int, k: int, vocab: int = V, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A Zipf-like teacher: low ids are frequent (as in frequency-ordered vocabularies), each token's
    logits add Gumbel noise. Returns the true top-k: ids int64 (t, k), logp float32 (t, k) sorted descending."""
    rng = np.random.default_rng(seed)
    logits = -1.1 * np.log1p(np.arange(vocab))[None, :] + 1.5 * rng.gumbel(size=(t, vocab))
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    top = np.argsort(-logp, axis=1)[:, :k]
    return top, np.take_along_axis(logp, top, 1).astype(np.float32)


def lookup(ids: np.ndarray, logp: np.ndarray, dec_ids: np.ndarray) -> np.ndarray:
    """The input log-prob of each decoded id (same shape as dec_ids)."""
    out = np.empty(dec_ids.shape)
    for t in range(len(ids)):
        m = dict(zip(ids[t].tolist(), logp[t].astype(np.float64).tolist()))
        out[t] = [m[i] for i in dec_ids[t].tolist()]
    return out


def round_trip(ids: np.ndarray, logp: np.ndarray, vocab: int = V, **kw) -> tuple[np.ndarray, ...]:
    return codec.decode_sequence(codec.encode_sequence(ids, logp, vocab, **kw))


def test_ids_exact_and_order_restored() -> None:
    ids, logp = zipf_topk(40, 64)
    dec_ids, dec_logp, _ = round_trip(ids, logp)
    assert dec_ids.dtype == np.int64 and dec_logp.dtype == np.float32 and dec_ids.shape == ids.shape
    for t in range(len(ids)):
        assert sorted(dec_ids[t].tolist()) == sorted(ids[t].tolist())
    assert (np.diff(dec_logp, axis=1) <= 0).all()
    # entries only swap within one quantisation level: the input order is kept up to max_step
    orig = lookup(ids, logp, dec_ids)
    running_min = np.minimum.accumulate(orig, axis=1)
    assert (orig <= running_min + codec.Quantiser().max_step + 1e-6).all()
    # well-separated values (0.6 nat apart > any level's width) come back in exactly the input order
    sep_logp = (-np.arange(64, dtype=np.float32) * 0.6 - 1.0)[None, :].repeat(3, 0)
    sep_logp -= np.log(np.exp(sep_logp[0].astype(np.float64)).sum()) + 0.1
    sep_ids = np.stack([np.random.default_rng(s).permutation(V)[:64] for s in range(3)])
    assert (round_trip(sep_ids, sep_logp)[0] == sep_ids).all()


@pytest.mark.parametrize(
    "qz", [codec.Quantiser(), codec.Quantiser(levels=6, max_step=1.0), codec.Quantiser(levels=64, max_step=0.125)]
)
def test_quantiser_bounds(qz: codec.Quantiser) -> None:
    """The grid's promises: |d' - d| <= max_step / 2 down to CLIP_NATS; sqrt(p/p0) within 1/(2L) on the
    sqrt part; the top-1 (d = 0) exact; levels monotone."""
    d = np.concatenate([np.linspace(0, codec.CLIP_NATS, 200_001), [0.0, qz.knee, codec.CLIP_NATS]])
    q = codec.quantise(d, qz)
    back = codec.dequantise(q, qz)
    assert np.abs(back - d).max() <= qz.max_step / 2 + 1e-9
    on_sqrt = d <= qz.knee
    assert np.abs(np.exp(-back[on_sqrt] / 2) - np.exp(-d[on_sqrt] / 2)).max() <= 1 / (2 * qz.levels) + 1e-12
    assert codec.dequantise(codec.quantise(np.zeros(1), qz), qz)[0] == 0.0
    assert (np.diff(q[:-3]) >= 0).all()
    assert codec.dequantise(codec.quantise(np.array([np.inf]), qz), qz)[0] == np.inf


@pytest.mark.parametrize("qz", [codec.Quantiser(), codec.Quantiser(levels=64, max_step=0.125)])
def test_decoded_value_error_bounded(qz: codec.Quantiser) -> None:
    """After renormalisation every log-prob is within max_step + 1/512 nats of the input (documented bound),
    and the mass-weighted error is far smaller (the sqrt part spends the levels where the mass is)."""
    ids, logp = zipf_topk(40, 64, seed=1)
    dec_ids, dec_logp, _ = round_trip(ids, logp, quantiser=qz)
    err = np.abs(dec_logp - lookup(ids, logp, dec_ids))
    assert err.max() <= qz.max_step + 1 / 512 + 1e-5
    p = np.exp(lookup(ids, logp, dec_ids))
    assert (p * err).sum() / p.sum() <= qz.max_step / 4


def random_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """A random small top-k: any k <= V, T >= 1, sharp or flat, ids shared across tokens or not,
    sometimes ties and -inf entries."""
    vocab = int(rng.choice([1, 2, 7, 100, 5000, V]))
    k = int(rng.integers(1, min(vocab, 96) + 1))
    t = int(rng.integers(1, 20))
    base = rng.normal(size=vocab) * rng.uniform(0, 4)
    logits = base[None, :] + rng.normal(size=(t, vocab)) * rng.uniform(0, 4)
    if rng.random() < 0.3:
        logits = np.round(logits)  # ties
    if rng.random() < 0.3 and vocab > 1:
        logits[:, rng.integers(vocab, size=vocab // 3)] = -np.inf
        logits[:, 0] = 0.0
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    ids = np.argsort(-logp, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(logp, ids, 1).astype(np.float32), vocab


def test_round_trip_fuzz() -> None:
    """Many random shapes and quantisers: exact id sets, -inf kept, values within the bound, proper distributions."""
    rng = np.random.default_rng(11)
    for case in range(150):
        ids, logp, vocab = random_case(rng)
        qz = codec.Quantiser(levels=int(rng.integers(1, 40)), max_step=int(rng.integers(1, 96)) / 64)
        dec_ids, dec_logp, dec_tail = round_trip(ids, logp, vocab, quantiser=qz)
        assert dec_ids.shape == ids.shape, case
        assert (np.sort(dec_ids, axis=1) == np.sort(ids, axis=1)).all(), case
        orig = lookup(ids, logp, dec_ids)
        assert (np.isneginf(orig) == np.isneginf(dec_logp)).all(), case
        finite = np.isfinite(orig) & (orig >= orig[:, :1] - codec.CLIP_NATS)
        assert np.abs(dec_logp[finite] - orig[finite]).max() <= qz.max_step + 1 / 512 + 1e-4, case
        total = np.exp(dec_logp.astype(np.float64)).sum(axis=1) + np.exp(dec_tail.astype(np.float64))
        np.testing.assert_allclose(total, 1.0, atol=1e-5, err_msg=str(case))


def test_tail_mass_preserved_and_distribution_proper() -> None:
    ids, logp = zipf_topk(30, 64, seed=2)
    _, dec_logp, dec_tail = round_trip(ids, logp)
    true_tail = np.log1p(-np.exp(logp.astype(np.float64)).sum(axis=1))
    assert np.abs(dec_tail - true_tail).max() <= 1 / 512 + 1e-5
    total = np.exp(dec_logp.astype(np.float64)).sum(axis=1) + np.exp(dec_tail.astype(np.float64))
    np.testing.assert_allclose(total, 1.0, atol=1e-5)
    # an explicit tail_logp (e.g. logsumexp of the rest, exact for tiny tails) is what comes back
    given = np.full(30, -20.0)
    assert np.abs(round_trip(ids, logp, tail_logp=given)[2] - given).max() <= 1 / 512 + 1e-5


def test_full_vocabulary_small_vocab() -> None:
    """k == V: a permutation of the whole vocabulary, no tail (-inf), probabilities sum to one."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(5, 7)) * 2
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    ids = np.argsort(-logp, axis=1)
    logp = np.take_along_axis(logp, ids, 1).astype(np.float32)
    dec_ids, dec_logp, dec_tail = round_trip(ids, logp, vocab=7)
    assert (np.sort(dec_ids, axis=1) == np.arange(7)).all()
    assert np.isneginf(dec_tail).all()
    np.testing.assert_allclose(np.exp(dec_logp.astype(np.float64)).sum(axis=1), 1.0, atol=1e-5)
    assert np.abs(dec_logp - lookup(ids, logp, dec_ids)).max() <= codec.Quantiser().max_step + 1e-5


def test_ties_keep_equal_values_in_id_order() -> None:
    ids = np.array([[9, 3, 7, 1, 5, 8]])
    logp = np.log(np.array([[0.3, 0.2, 0.2, 0.2, 0.05, 0.05]], dtype=np.float32))
    dec_ids, dec_logp, _ = round_trip(ids, logp, vocab=10)
    assert dec_ids.tolist() == [[9, 1, 3, 7, 5, 8]]
    assert dec_logp[0, 1] == dec_logp[0, 2] == dec_logp[0, 3] and dec_logp[0, 4] == dec_logp[0, 5]


def test_neg_inf_and_very_small_log_probs() -> None:
    """-inf (zero-mass) entries decode to -inf; finite entries far below the top-1 are clipped to
    CLIP_NATS below it (finite, never NaN); the rest keep the bound."""
    ids = np.array([[4, 0, 2, 1, 3, 5]])
    logp = np.array([[np.log(0.9), np.log(0.09), -30.0, -300.0, -np.inf, -np.inf]], dtype=np.float32)
    dec_ids, dec_logp, dec_tail = round_trip(ids, logp, vocab=6)
    assert dec_ids.tolist() == [[4, 0, 2, 1, 3, 5]]
    assert np.isneginf(dec_logp[0, 4:]).all() and np.isfinite(dec_logp[0, :4]).all()
    assert abs(dec_logp[0, 3] - (dec_logp[0, 0] - codec.CLIP_NATS)) <= codec.Quantiser().max_step / 2 + 1e-4
    assert abs(dec_logp[0, 2] - (-30.0)) <= codec.Quantiser().max_step + 1e-3
    assert np.isneginf(dec_tail).all()  # k == V
    # the same with a larger vocabulary: the tail (0.01) comes back
    dec = round_trip(ids, logp, vocab=100)
    assert abs(np.exp(dec[2][0]) - 0.01) < 1e-4


def test_single_token_and_empty() -> None:
    ids, logp = zipf_topk(1, 16, seed=4)
    dec_ids, _, dec_tail = round_trip(ids, logp)
    assert dec_ids.shape == (1, 16) and dec_tail.shape == (1,)
    assert sorted(dec_ids[0].tolist()) == sorted(ids[0].tolist())
    e_ids, e_logp, e_tail = round_trip(np.zeros((0, 16), np.int64), np.zeros((0, 16), np.float32))
    assert e_ids.shape == (0, 16) and e_logp.shape == (0, 16) and e_tail.shape == (0,)
    cols = codec.encode_batch([], [], V)
    assert len(cols[codec.COLUMN]) == 0
    empty = codec.decode_batch(pa.table(cols), seq_len=8)
    assert empty.ids.shape[:2] == (0, 8) and empty.mask.shape == (0, 8)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda i, p: (i, np.where(np.arange(p.size).reshape(p.shape) == 5, np.nan, p)), "NaN"),
        (lambda i, p: (np.where(i == i[0, 0], V, i), p), "outside the vocabulary"),
        (lambda i, p: (i, p[:, ::-1]), "sorted descending"),
        (lambda i, p: (i, p + 5.0), "log_softmax"),
        (lambda i, p: (np.where(i == i[0, 1], i[0, 0], i), p), "distinct"),
        (lambda i, p: (i, np.full_like(p, np.log(0.5))), "sums to"),
        (lambda i, p: (i[:, :3], p), r"\(T, k\)"),
        (lambda i, p: (i.astype(np.float32), p), "integers"),
    ],
)
def test_bad_input_errors(mutate, message: str) -> None:
    ids, logp = zipf_topk(4, 8, seed=5)
    bad_ids, bad_logp = mutate(ids, logp)
    with pytest.raises(ValueError, match=message):
        codec.encode_sequence(bad_ids, bad_logp, V)


def test_bad_blobs() -> None:
    ids, logp = zipf_topk(4, 8, seed=6)
    blob = codec.encode_sequence(ids, logp, V)
    with pytest.raises(ValueError, match="format version"):
        codec.decode_sequence(bytes([codec.FORMAT_VERSION + 1]) + blob[1:])
    with pytest.raises(ValueError, match="corrupt"):
        codec.decode_sequence(blob[: len(blob) // 3])


def test_batch_round_trip_through_parquet(tmp_path) -> None:
    """Padded (B, T, k) + lengths -> Parquet (the advertised write options) -> padded batch with a mask,
    identical to per-sequence decoding."""
    ids, logp = zipf_topk(3 * 12, 32, seed=7)
    ids, logp = ids.reshape(3, 12, 32), logp.reshape(3, 12, 32)
    lengths = np.array([12, 5, 0])
    table = pa.table(codec.encode_batch(ids, logp, V, lengths=lengths))
    assert table.schema.equals(codec.arrow_schema(), check_metadata=False)
    pq.write_table(table, tmp_path / "p.parquet", **codec.parquet_write_kwargs())
    back = pq.read_table(tmp_path / "p.parquet")
    batch = codec.decode_batch(back, seq_len=16)
    assert batch.ids.shape == (3, 16, 32) and batch.logp.shape == (3, 16, 32) and batch.tail_logp.shape == (3, 16)
    assert batch.mask.sum(axis=1).tolist() == [12, 5, 0]
    for r, n in enumerate(lengths):
        want = codec.decode_sequence(codec.encode_sequence(ids[r, :n], logp[r, :n], V))
        assert (batch.ids[r, :n] == want[0]).all() and (batch.logp[r, :n] == want[1]).all()
        assert (batch.tail_logp[r, :n] == want[2]).all()
    assert (batch.ids[~batch.mask] == 0).all() and np.isneginf(batch.logp[~batch.mask]).all()
    assert (batch.tail_logp[~batch.mask] == 0).all()
    assert (codec.decode_batch(back.column(codec.COLUMN), 16).ids == batch.ids).all()
    assert (codec.decode_batch(back.column(codec.COLUMN).to_pylist(), 16).ids == batch.ids).all()
    with pytest.raises(ValueError, match="seq_len"):
        codec.decode_batch(back, seq_len=8)


def test_decode_rows_matches_per_row_decoding() -> None:
    """The batch-vectorised decoder (all rows in one pass) gives exactly what each row decodes to alone,
    whatever the rows' lengths and dictionary sizes (including empty rows)."""
    blobs, want = [], []
    for seed, t in enumerate([5, 0, 1, 17, 3, 0, 9]):
        ids, logp = zipf_topk(t, 24, seed=20 + seed)
        blobs.append(codec.encode_sequence(ids, logp, V))
        want.append(codec.decode_sequence(blobs[-1]))
    ids, logp, tail, t_rows = codec.decode_rows(blobs)
    assert t_rows.tolist() == [5, 0, 1, 17, 3, 0, 9]
    assert (ids == np.concatenate([w[0] for w in want])).all()
    assert (logp == np.concatenate([w[1] for w in want])).all()
    assert (tail == np.concatenate([w[2] for w in want])).all()
    other_k = codec.encode_sequence(*zipf_topk(2, 8, seed=1), V)
    with pytest.raises(ValueError, match="share vocab_size, k"):
        codec.decode_rows([blobs[0], other_k])


# Measured 113.7 B/token (format version 1, default Quantiser) on this synthetic, whose ids are far less
# predictable than a real teacher's (84 B/token in bench/lm_cache.py); the bound leaves ~2%.
ZIPF_BYTES_PER_TOKEN_BOUND = 116.0


def test_size_budget_zipf(tmp_path) -> None:
    """Parquet bytes / token at k = 64, V = 30,522 on a Zipf-like teacher: fails if the format grows."""
    ids, logp = zipf_topk(8 * 32, 64, seed=8)
    table = pa.table(codec.encode_batch(ids.reshape(8, 32, 64), logp.reshape(8, 32, 64), V))
    pq.write_table(table, tmp_path / "z.parquet", **codec.parquet_write_kwargs())
    per_token = (tmp_path / "z.parquet").stat().st_size / (8 * 32)
    assert per_token <= ZIPF_BYTES_PER_TOKEN_BOUND, per_token
