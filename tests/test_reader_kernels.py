"""The reader's compiled loops (data_pipes/kernels.py) against hand-computed cases and plain
Python references on random inputs (every dtype the reader passes)."""

import numpy as np
import pytest

from data_pipes.kernels import fill_histories, take_ranges, warm


def test_take_ranges_hand_computed():
    values = np.array([10, 11, 12, 13, 14, 15], dtype=np.int32)
    out = take_ranges(np.array([4, 0, 2]), np.array([2, 0, 3]), values)
    assert out.dtype == np.int32
    assert out.tolist() == [14, 15, 12, 13, 14]
    assert take_ranges(np.zeros(0, np.int64), np.zeros(0, np.int64), values).size == 0


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_take_ranges_matches_slices(dtype):
    rng = np.random.default_rng(0)
    values = rng.integers(0, 1 << 30, 500).astype(dtype)
    lens = rng.integers(0, 7, 200)
    starts = rng.integers(0, values.size - 7, 200)
    ref = np.concatenate([values[s:s + n] for s, n in zip(starts, lens, strict=True)])
    np.testing.assert_array_equal(take_ranges(starts, lens, values), ref)


def test_fill_histories_hand_computed():
    # two rows written at batch rows 1 and 2 (row0 = 1), sequence values from position 3
    values = np.array([7, 8, 9, 5], dtype=np.int32)
    table = np.array([[0, 0], [1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11, 12], [13, 14],
                      [15, 16], [17, 18]], dtype=np.int32)
    seq = np.full(6, -1, np.int64)
    hist = np.full((3, 3), -1, np.int64)
    tok = np.full((3, 3, 2), -1, np.int32)
    fill_histories(np.array([1, 3]), np.array([2, 0]), values, 1, 3, seq, hist, tok, table)
    assert seq.tolist() == [-1, -1, -1, 8, 9, -1]
    assert hist.tolist() == [[-1, -1, -1], [8, 9, 0], [0, 0, 0]]
    assert tok[1].tolist() == [[15, 16], [17, 18], [0, 0]]
    assert tok[2].tolist() == [[0, 0]] * 3
    assert (tok[0] == -1).all()       # rows outside the part untouched


@pytest.mark.parametrize("ids", [True, False])
@pytest.mark.parametrize("tokens", [True, False])
@pytest.mark.parametrize("n_tok", [1, 2, 3, 4])   # rows of 4, 8, 12, 16 bytes
def test_fill_histories_matches_reference(ids, tokens, n_tok):
    rng = np.random.default_rng(1)
    n_items, b, width = 50, 64, 9
    table = rng.integers(0, 300, (n_items + 1, n_tok)).astype(np.int32)
    values = rng.integers(1, n_items + 1, 400).astype(np.int32)
    lens = rng.integers(0, width + 1, b)
    lens[width:] = np.minimum(lens[width:], 5)      # some rows shorter than the width
    starts = rng.integers(0, values.size - width, b)
    seq = np.zeros(int(lens.sum()), np.int64) if ids else None
    hist = np.full((b, width), -1, np.int64) if ids else None
    tok = np.full((b, width, n_tok), -1, np.int32) if tokens else None
    fill_histories(starts, lens, values, 0, 0, seq, hist, tok, table if tokens else None)
    o = 0
    for i in range(b):
        items = values[starts[i]:starts[i] + lens[i]]
        padded = np.r_[items, np.zeros(width - lens[i], np.int32)]
        if ids:
            np.testing.assert_array_equal(seq[o:o + lens[i]], items)
            np.testing.assert_array_equal(hist[i], padded)
        if tokens:
            np.testing.assert_array_equal(tok[i], table[padded])
        o += lens[i]


def test_warm_runs():
    warm()   # the fork server's preload (data_pipes/worker_preload.py) must not fail


def test_token_words_copy_every_bit_pattern():
    """Rows copied as one word (complex128 for four int32 tokens) keep their bits, also those
    that read as NaNs or denormals as floats."""
    table = np.array([[0, 0, 0, 0], [-1, -1, -1, -1], [1, 0, 0x7FF00000, 0x7FF80001],
                      [0x00000001, 0x000FFFFF, -2147483648, 2147483647]], dtype=np.int32)
    tok = np.full((2, 3, 4), 5, np.int32)
    fill_histories(np.array([0, 2]), np.array([3, 1]), np.array([1, 2, 3, 3], np.int32), 0, 0,
                   None, None, tok, table)
    np.testing.assert_array_equal(tok[0], table[[1, 2, 3]])
    np.testing.assert_array_equal(tok[1], table[[3, 0, 0]])


def test_warm_loads_every_signature_the_reader_uses(tiny_dataset) -> None:  # noqa: ANN001
    """The fork server preloads the kernels with `warm()` so its workers never compile or
    load one: an epoch of every batch layout adds no signature to any kernel."""
    from data_pipes import kernels
    from data_pipes.stream import build_loader

    warm()
    jitted = [getattr(kernels, n) for n in dir(kernels) if hasattr(getattr(kernels, n),
                                                                   "signatures")]
    before = {k.py_func.__name__: len(k.signatures) for k in jitted}
    assert before["_cut_block"] and before["_fill_fields"] and before["_fill_token_words"]
    for tokens in (True, False):
        for ids in (True, False):
            loader = build_loader(tiny_dataset, "train", batch_size=7, with_tokens=tokens,
                                  with_history_ids=ids)
            assert sum(b.size for b in loader) > 0
    assert {k.py_func.__name__: len(k.signatures) for k in jitted} == before
