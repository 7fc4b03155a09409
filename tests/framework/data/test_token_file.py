"""Token file format: roundtrip, dtype choice, atomic writes and loud failures on bad files.
Also the synthetic stream, which must be deterministic and carry learnable structure."""

import json

import numpy as np
import pytest

from framework.data.synthetic import synthetic_tokens
from framework.data.token_file import InMemoryTokens, TokenFile, write_token_file


def test_roundtrip_uint16(tmp_path):
    tokens = np.array([0, 5, 255, 65535, 7], dtype=np.int64)
    write_token_file(tmp_path / "sub" / "train", tokens, vocab_size=65536)
    tf = TokenFile(tmp_path / "sub" / "train")
    assert tf.dtype == "uint16"
    assert (tf.num_tokens, len(tf), tf.vocab_size) == (5, 5, 65536)
    window = tf.window(1, 3)
    assert window.dtype == np.int64
    np.testing.assert_array_equal(window, tokens[1:4])
    assert (tmp_path / "sub" / "train.bin").stat().st_size == 10
    assert not list((tmp_path / "sub").glob("*.tmp"))


def test_uint32_when_vocab_exceeds_uint16(tmp_path):
    tokens = np.array([0, 70000, 65536, 3])
    write_token_file(tmp_path / "big", tokens, vocab_size=70001)
    tf = TokenFile(tmp_path / "big")
    assert tf.dtype == "uint32"
    np.testing.assert_array_equal(tf.window(0, 4), tokens)
    assert json.loads((tmp_path / "big.json").read_text())["dtype"] == "uint32"


def test_out_of_range_tokens_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        write_token_file(tmp_path / "x", np.array([1, 256]), vocab_size=256)
    with pytest.raises(ValueError, match="outside"):
        write_token_file(tmp_path / "x", np.array([-1, 2]), vocab_size=256)
    assert not (tmp_path / "x.json").exists()


def test_truncated_bin_names_the_file(tmp_path):
    write_token_file(tmp_path / "t", np.arange(100), vocab_size=256)
    bin_path = tmp_path / "t.bin"
    bin_path.write_bytes(bin_path.read_bytes()[:-3])
    with pytest.raises(ValueError, match="t.bin.*truncated"):
        TokenFile(tmp_path / "t")


def test_missing_sidecar_and_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        TokenFile(tmp_path / "nope")
    write_token_file(tmp_path / "f", np.arange(10), vocab_size=16)
    meta = json.loads((tmp_path / "f.json").read_text())
    (tmp_path / "f.json").write_text(json.dumps({**meta, "format": "other-v9"}))
    with pytest.raises(ValueError, match="other-v9"):
        TokenFile(tmp_path / "f")


def test_rewrite_replaces_old_pair(tmp_path):
    write_token_file(tmp_path / "r", np.arange(10), vocab_size=16)
    write_token_file(tmp_path / "r", np.arange(4), vocab_size=100_000)
    tf = TokenFile(tmp_path / "r")
    assert (tf.num_tokens, tf.dtype) == (4, "uint32")


def test_window_bounds_checked(tmp_path):
    src = InMemoryTokens(np.arange(10), vocab_size=10)
    assert src.window(7, 3).tolist() == [7, 8, 9]
    with pytest.raises(IndexError, match="start=8 length=3"):
        src.window(8, 3)


def test_synthetic_is_deterministic():
    a = synthetic_tokens(5000, 256, seed=3)
    b = synthetic_tokens(5000, 256, seed=3)
    assert a.dtype == np.int64 and a.shape == (5000,)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, synthetic_tokens(5000, 256, seed=4))
    assert a.min() >= 0 and a.max() < 256


def test_synthetic_has_learnable_bigram_structure():
    vocab = 256
    tokens = synthetic_tokens(200_000, vocab, seed=0)
    counts = np.zeros((vocab, vocab))
    np.add.at(counts, (tokens[:-1], tokens[1:]), 1)
    joint = counts / counts.sum()
    cond = counts / counts.sum(axis=1, keepdims=True)
    nz = counts > 0
    entropy = -(joint[nz] * np.log(cond[nz])).sum()
    assert entropy < 0.5 * np.log(vocab)
