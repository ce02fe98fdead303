import json
import math

import numpy as np
import pytest
import torch

from memdec.errors import DatastoreError
from memdec.files import NpyAppender, check_npy
from memdec.index import build_index, search
from memdec.targets import (
    LOG_CODE_STEPS,
    KnnTargets,
    decode_log_u8,
    drop_self,
    encode_log_u8,
    knn_distribution,
    knn_target_logprob,
    lookup_values,
    validate_targets,
)


def dense_reference(dists, values, temperature, vocab):
    """The kNN distribution as a dense [B, V] matrix, the slow obvious way (tests only)."""
    logits = np.where(values >= 0, -dists.astype(np.float64) / temperature, -np.inf)
    w = np.exp(logits - logits.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    dense = np.zeros((len(values), vocab))
    for i in range(len(values)):
        for j in range(values.shape[1]):
            if values[i, j] >= 0:
                dense[i, values[i, j]] += w[i, j]
    return dense


def random_neighbours(b=6, k=40, vocab=12, seed=0):
    rng = np.random.default_rng(seed)
    dists = np.sort(rng.uniform(5, 30, (b, k)), axis=1).astype(np.float32)
    values = rng.integers(0, vocab, (b, k)).astype(np.int32)
    return dists, values


def to_dense(offsets, token_ids, probs, vocab):
    dense = np.zeros((len(offsets) - 1, vocab))
    rows = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    dense[rows, token_ids] = probs
    return dense


@pytest.mark.parametrize("temperature", [1.0, 4.0, 50.0])
def test_knn_distribution_matches_dense_reference(temperature):
    dists, values = random_neighbours()
    values[2, 5:] = -1  # empty slots (approximate search) carry no mass
    offsets, token_ids, probs = knn_distribution(dists, values, temperature, min_prob=0.0)
    assert offsets.dtype == np.int64 and token_ids.dtype == np.int32 and probs.dtype == np.float32
    ref = dense_reference(dists, values, temperature, 12)
    np.testing.assert_allclose(to_dense(offsets, token_ids, probs, 12), ref, atol=1e-6)
    np.testing.assert_array_equal(np.diff(offsets), (ref > 0).sum(1))  # one entry per distinct token
    for i in range(len(offsets) - 1):  # the canonical order: by token id
        assert np.all(np.diff(token_ids[offsets[i] : offsets[i + 1]]) > 0)


def test_top_m_truncation_renormalises_and_reports_kl():
    dists, values = random_neighbours()
    full = dense_reference(dists, values, 8.0, 12)
    offsets, token_ids, probs, kept = knn_distribution(dists, values, 8.0, top_m=3, return_kept_mass=True)
    assert np.all(np.diff(offsets) == 3)
    for i in range(len(dists)):
        top = np.argsort(-full[i], kind="stable")[:3]
        assert set(token_ids[offsets[i] : offsets[i + 1]]) == set(top)
        assert math.isclose(kept[i], full[i, top].sum(), rel_tol=1e-9)
        np.testing.assert_allclose(probs[offsets[i] : offsets[i + 1]].sum(), 1.0, atol=1e-6)
        np.testing.assert_allclose(
            np.sort(probs[offsets[i] : offsets[i + 1]]), np.sort(full[i, top] / kept[i]), rtol=1e-6
        )
    # KL(p_M || p) = -log(kept mass)
    i = 0
    p_m = np.zeros(12)
    p_m[token_ids[: offsets[1]]] = probs[: offsets[1]]
    kl = sum(q * math.log(q / full[i, t]) for t, q in enumerate(p_m) if q > 0)
    assert math.isclose(kl, -math.log(kept[0]), rel_tol=1e-5)


def test_negligible_mass_is_dropped_but_each_row_keeps_its_top():
    dists = np.array([[0.0, 100.0, 200.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    values = np.array([[1, 2, 3], [4, 5, 5]], dtype=np.int32)
    offsets, token_ids, probs = knn_distribution(dists, values, temperature=1.0)
    assert offsets.tolist() == [0, 1, 3]
    assert token_ids.tolist() == [1, 4, 5]  # each row by token id
    np.testing.assert_allclose(probs, [1.0, 1 / 3, 2 / 3], rtol=1e-6)


def test_knn_target_logprob_numpy_and_torch():
    dists, values = random_neighbours(seed=3)
    ref = dense_reference(dists, values, 3.0, 12)
    targets = np.array([0, 1, 2, 3, 4, 99])  # 99 is never a neighbour's value
    with np.errstate(divide="ignore"):
        expected = np.log(np.append(ref, np.zeros((len(ref), 100)), axis=1)[np.arange(6), targets])
    got = knn_target_logprob(dists, values, targets, 3.0)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got[:5], expected[:5], rtol=1e-5)
    assert got[5] == -np.inf
    got_t = knn_target_logprob(torch.from_numpy(dists), torch.from_numpy(values), torch.from_numpy(targets), 3.0)
    assert got_t.dtype == torch.float32
    np.testing.assert_allclose(got_t.numpy(), got, rtol=1e-6)
    # it agrees with the sparse rows
    offsets, token_ids, probs = knn_distribution(dists, values, 3.0, min_prob=0.0)
    row = 1
    hit = token_ids[offsets[row] : offsets[row + 1]] == targets[row]
    assert math.isclose(math.log(probs[offsets[row] : offsets[row + 1]][hit][0]), got[row], rel_tol=1e-5)


def test_own_entry_never_among_neighbours_even_with_duplicate_keys():
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(500, 8)).astype(np.float32)
    keys[100:110] = keys[100]  # ten identical keys
    keys[200:202] = keys[200]
    values = rng.integers(0, 30, 500).astype(np.int32)
    index = build_index(keys, "flat")
    k = 12
    query_ids = np.arange(500)
    dists, ids = search(index, keys, k + 1)
    d2, i2 = drop_self(dists, ids, query_ids)
    assert i2.shape == (500, k)
    assert not (i2 == query_ids[:, None]).any()
    # duplicates of the query stay: position 100 keeps its 9 twins, at distance ~0
    assert set(range(101, 110)) <= set(i2[100])
    # order is kept; a row lacking its own id loses its farthest entry
    fake_ids = np.array([[5, 6, 7, 8]])
    assert drop_self(np.array([[1.0, 2, 3, 4]]), fake_ids, np.array([99]))[1].tolist() == [[5, 6, 7]]
    assert drop_self(np.array([[1.0, 2, 3, 4]]), fake_ids, np.array([7]))[1].tolist() == [[5, 6, 8]]
    assert lookup_values(np.array([[3, -1]]), values).tolist() == [[values[3], -1]]


def test_npy_appender_resumes_byte_for_byte(tmp_path):
    path = tmp_path / "a.npy"
    w = NpyAppender(path, np.float16)
    w.append(np.arange(5))
    w.flush()
    w.append(np.arange(5, 9))  # never flushed: an interrupted chunk
    w.f.close()
    w = NpyAppender(path, np.float16, n=5)
    w.append(np.arange(5, 9))
    w.close()
    assert np.load(path).tolist() == list(range(9))
    assert check_npy(path, np.float16, (9,)) == (9,)
    with pytest.raises(DatastoreError, match="shorter"):
        NpyAppender(path, np.float16, n=20)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(DatastoreError, match="truncated"):
        check_npy(path, np.float16)


def test_load_targets_needs_a_finished_step(tmp_path, store):
    from memdec.store import open_targets

    with pytest.raises(DatastoreError, match="not a datastore"):
        open_targets(tmp_path)
    manifest = json.loads((store / "manifest.json").read_text())  # a whole manifest: a partial one is refused first
    manifest["steps"]["targets"] = {"status": "running"}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatastoreError, match="not built"):
        open_targets(tmp_path)


def test_uint8_log_codes_round_trip_within_their_step():
    dists, values = random_neighbours(b=50, k=64, vocab=40, seed=4)
    values[7] = 3  # a row of one token
    offsets, tokens, probs = knn_distribution(dists, values, 2.0, min_prob=0.0)
    probs[offsets[3] + 1] = probs[offsets[3]] * 1e-9  # an entry past code 255: dropped
    row3 = probs[offsets[3] : offsets[4]]
    row3 /= row3.sum()
    off8, tok8, codes, kept = encode_log_u8(offsets, tokens, probs)
    assert codes.dtype == np.uint8 and off8.dtype == np.int64 and len(off8) == 51
    lost = tokens[offsets[3] + 1]
    assert lost not in tok8[off8[3] : off8[4]] and len(tok8) == len(tokens) - 1
    np.testing.assert_allclose(kept[3], 1 - float(probs[offsets[3] + 1]), rtol=1e-6)
    assert np.all(kept[np.arange(50) != 3] == 1.0)
    rows = np.repeat(np.arange(50), np.diff(off8))
    assert np.all(np.minimum.reduceat(codes, off8[:-1]) == 0)  # each row's most probable entry is code 0
    decoded = decode_log_u8(off8, codes)
    assert decoded.dtype == np.float32
    np.testing.assert_allclose(np.bincount(rows, weights=decoded), 1.0, rtol=1e-6)
    # the same entries, renormalised over what was kept: each within half a code step, relative
    ref = np.concatenate(
        [
            probs[offsets[i] : offsets[i + 1]][
                np.isin(tokens[offsets[i] : offsets[i + 1]], tok8[off8[i] : off8[i + 1]])
            ]
            for i in range(50)
        ]
    )
    ref = ref / np.bincount(rows, weights=ref)[rows]
    ratio = decoded / ref
    bound = math.exp(1 / LOG_CODE_STEPS) - 1  # half a step each for the entry and, at worst, the row sum
    assert np.abs(ratio - 1).max() <= bound
    assert off8[8] - off8[7] == 1 and decoded[off8[7]] == 1.0 and codes[off8[7]] == 0


def test_uint8_targets_gather_and_validation():
    dists, values = random_neighbours(b=20, k=30, vocab=25, seed=5)
    offsets, tokens, probs = knn_distribution(dists, values, 3.0)
    off8, tok8, codes, _ = encode_log_u8(offsets, tokens, probs)
    t = KnnTargets(off8, tok8, codes, k=30, temperature=3.0, top_m=None, prob_dtype="uint8")
    assert validate_targets(off8, tok8, codes, "x", "uint8") == tok8.max()
    o, ids, p = t.gather([4, 0, 4])
    assert p.dtype == np.float32
    for j, pos in enumerate([4, 0, 4]):
        row_ids, row_p = t.row(pos)
        np.testing.assert_array_equal(ids[o[j] : o[j + 1]], row_ids)
        np.testing.assert_allclose(p[o[j] : o[j + 1]], row_p, rtol=1e-6)
        np.testing.assert_allclose(row_p.sum(), 1.0, rtol=1e-6)
    bad = codes.copy()
    bad[off8[6] : off8[7]] += 1  # row 6 lost its most probable entry
    with pytest.raises(DatastoreError, match="row 6 of the 8-bit kNN targets has no code 0"):
        validate_targets(off8, tok8, bad, "x", "uint8")
