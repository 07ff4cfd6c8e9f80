"""dba.data: tokenizers, token files, split and batch sampling."""

import os
import tempfile
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dba.data import (
    check_enough,
    get_tokenizer,
    load_tokens,
    sample_batch,
    split_train_val,
    tokenizer_from_dict,
)
from dba.errors import UserError
from tests.support import write_hf_tokenizer


# ---------------------------------------------------------------- tokenizers


def test_byte_tokenizer_utf8_round_trip():
    tok = get_tokenizer("byte")
    assert tok.vocab_size == 256 and tok.name == "byte"
    # "é" is U+00E9 -> UTF-8 bytes C3 A9
    assert tok.encode("héllo") == [0x68, 0xC3, 0xA9, 0x6C, 0x6C, 0x6F]
    assert tok.decode([0x68, 0xC3, 0xA9]) == "hé"
    # a lone continuation byte is not valid UTF-8: replaced, not raised
    assert tok.decode([0x41, 0xA9]) == "A\ufffd"
    assert tokenizer_from_dict(tok.to_dict()).encode("ab") == [97, 98]


def test_unknown_tokenizer():
    with pytest.raises(UserError, match="unknown tokenizer 'wordpiece'"):
        get_tokenizer("wordpiece")
    with pytest.raises(UserError, match="no word tokenizer"):  # v29's default name: ids only
        get_tokenizer("word")
    with pytest.raises(UserError):
        tokenizer_from_dict({"vocab_size": 3})


@pytest.mark.parametrize("name", ["tiktoken", "gpt2"])
def test_tiktoken_works_or_fails_fast_and_clearly(name):
    t0 = time.time()
    try:
        tok = get_tokenizer(name)
    except UserError as e:  # offline: the BPE files cannot be fetched
        assert time.time() - t0 < 15
        assert "tiktoken" in str(e) and "\n" not in str(e)
        return
    assert tok.vocab_size == 50257
    assert tok.encode("hello world") == [31373, 995]  # well-known GPT-2 ids
    assert tok.decode([31373, 995]) == "hello world"
    assert tokenizer_from_dict(tok.to_dict()).vocab_size == 50257


# ---------------------------------------------------------------- files


def test_npy_is_memory_mapped(tmp_path):
    arr = np.array([5, 0, 7, 300, 2], dtype=np.uint16)
    p = tmp_path / "tok.npy"
    np.save(p, arr)
    tokens, vocab, tok = load_tokens(str(p))
    assert isinstance(tokens, np.memmap)
    assert tokens.dtype == np.uint16 and tokens.tolist() == [5, 0, 7, 300, 2]
    assert vocab == 301 and tok is None  # max id + 1, no rounding
    assert load_tokens(str(p), vocab_size=50257)[1] == 50257


@pytest.mark.parametrize("dtype", ["float32", "int8", "uint8", "float64"])
def test_npy_unsupported_dtype_is_named(tmp_path, dtype):
    p = tmp_path / "tok.npy"
    np.save(p, np.arange(4).astype(dtype))
    with pytest.raises(UserError, match=dtype):
        load_tokens(str(p))


def test_bin_with_dtype(tmp_path):
    p = tmp_path / "tok.bin"
    np.array([1, 70000, 3], dtype="<u4").tofile(p)
    tokens, vocab, _ = load_tokens(str(p), data_dtype="uint32")
    assert tokens.tolist() == [1, 70000, 3] and vocab == 70001
    # 12 bytes read as uint16 gives 6 ids; 70000 = 0x11170 -> low half 0x1170, high half 1
    assert load_tokens(str(p), data_dtype="uint16")[0].tolist() == [1, 0, 0x1170, 1, 3, 0]
    with pytest.raises(UserError, match="not supported"):
        load_tokens(str(p), data_dtype="float16")


def test_bin_size_not_multiple_of_dtype(tmp_path):
    p = tmp_path / "odd.bin"
    p.write_bytes(b"\x01\x00\x02")
    with pytest.raises(UserError, match=r"odd\.bin.*3 bytes.*multiple of 2"):
        load_tokens(str(p))


def test_vocab_check_names_largest_id_index_and_vocab(tmp_path):
    arr = np.array([1, 2, 50300, 4, 50256, 60000, 9], dtype=np.uint16)
    p = tmp_path / "big.npy"
    np.save(p, arr)
    with pytest.raises(UserError) as ei:
        load_tokens(str(p), vocab_size=50257)
    msg = str(ei.value)
    assert "60000" in msg and "index 5" in msg and "50257" in msg and "big.npy" in msg


def test_negative_ids_rejected(tmp_path):
    p = tmp_path / "neg.npy"
    np.save(p, np.array([3, 1, -7, 2], dtype=np.int32))
    with pytest.raises(UserError, match=r"negative token id -7 at index 2"):
        load_tokens(str(p))


def test_file_errors(tmp_path):
    with pytest.raises(UserError, match="not found.*nope.npy"):
        load_tokens(str(tmp_path / "nope.npy"))
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(UserError, match="empty.*empty.bin"):
        load_tokens(str(tmp_path / "empty.bin"))
    with pytest.raises(UserError, match="directory"):
        load_tokens(str(tmp_path))
    (tmp_path / "junk.npy").write_bytes(b"this is not an npy file")
    with pytest.raises(UserError, match="junk.npy"):
        load_tokens(str(tmp_path / "junk.npy"))
    (tmp_path / "data.xyz").write_bytes(b"abc")
    with pytest.raises(UserError, match="data format"):
        load_tokens(str(tmp_path / "data.xyz"))
    with pytest.raises(UserError, match="unknown data format"):
        load_tokens(str(tmp_path / "data.xyz"), data_format="parquet")
    with pytest.raises(UserError, match="vocab_size"):
        load_tokens(None, vocab_size=0)


def test_npy_detected_by_magic_without_suffix(tmp_path):
    p = tmp_path / "tokens.npy"
    np.save(p, np.array([4, 5], dtype=np.int64))
    os.rename(p, tmp_path / "tokens.dat")
    assert load_tokens(str(tmp_path / "tokens.dat"))[0].tolist() == [4, 5]


def test_text_file_byte_tokenizer(tmp_path):
    text = "naïve café\nline two"
    p = tmp_path / "corpus.txt"
    p.write_text(text, encoding="utf-8")
    tokens, vocab, tok = load_tokens(str(p))
    assert tokens.tolist() == list(text.encode("utf-8"))
    assert vocab == 256 and tok.name == "byte"
    # any extension is text to tokenize when asked for (utf8; v29's `text` is integer ids)
    q = tmp_path / "corpus.md"
    q.write_text(text, encoding="utf-8")
    assert load_tokens(str(q), data_format="utf8")[0].tolist() == tokens.tolist()
    with pytest.raises(UserError, match="index"):  # ids up to 0xC3 don't fit vocab 128
        load_tokens(str(p), vocab_size=128)


def test_default_corpus_is_pydoc_topics():
    from pydoc_data.topics import topics

    tokens, vocab, tok = load_tokens(None)
    keys = sorted(topics)
    first = topics[keys[0]].encode("utf-8")
    total = sum(len(topics[k].encode("utf-8")) for k in keys)
    assert vocab == 256 and tok.name == "byte"
    assert tokens[: len(first)].tolist() == list(first)
    # every topic's bytes plus one separator between consecutive topics
    sep = len(tokens) - total
    assert sep >= 0 and sep % (len(keys) - 1) == 0
    assert len(tokens) > 200_000 and int(tokens.max()) < 256


@settings(max_examples=30, deadline=None)
@given(
    dtype=st.sampled_from(["uint16", "uint32", "int32", "int64"]),
    data=st.data(),
)
def test_npy_and_bin_round_trip(dtype, data):
    hi = {"uint16": 2**16 - 1, "uint32": 2**32 - 1, "int32": 2**31 - 1, "int64": 2**40}[dtype]
    values = data.draw(st.lists(st.integers(0, hi), min_size=1, max_size=200))
    arr = np.array(values, dtype=dtype)
    with tempfile.TemporaryDirectory() as d:
        np.save(os.path.join(d, "t.npy"), arr)
        arr.tofile(os.path.join(d, "t.bin"))
        t_npy, v_npy, _ = load_tokens(os.path.join(d, "t.npy"))
        t_bin, v_bin, _ = load_tokens(os.path.join(d, "t.bin"), data_dtype=dtype)
        assert t_npy.dtype == np.dtype(dtype) and t_bin.dtype == np.dtype(dtype)
        assert t_npy.tolist() == values and t_bin.tolist() == values
        assert v_npy == v_bin == max(values) + 1
        del t_npy, t_bin  # release the memmaps before the directory goes


# ---------------------------------------------------------------- split and sampling


def test_split_tail_views():
    tokens = np.arange(1000, dtype=np.uint16)
    train, val = split_train_val(tokens, 0.1)
    assert len(train) == 900 and len(val) == 100
    assert val[0] == 900 and val[-1] == 999  # the tail, as v29
    assert np.shares_memory(train, tokens) and np.shares_memory(val, tokens)
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(UserError, match="val_frac"):
            split_train_val(tokens, bad)
    with pytest.raises(UserError, match="at least 2"):
        split_train_val(np.arange(10), 0.05)


def test_check_enough():
    check_enough(np.arange(9), 8, "val")
    with pytest.raises(UserError, match=r"val has 8 tokens.*9"):
        check_enough(np.arange(8), 8, "val")


def test_sample_batch_windows_and_determinism(tmp_path):
    n, B, T = 5000, 16, 32
    p = tmp_path / "seq.npy"
    np.save(p, np.arange(n, dtype=np.int64))
    tokens = load_tokens(str(p))[0]  # memmap, to exercise the gather on it
    x, y = sample_batch(tokens, B, T, seed=7, step=3)
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == np.int32
    # token i == i, so every row must be a run of consecutive ids and y must be x + 1
    assert (np.diff(x, axis=1) == 1).all() and (y == x + 1).all()
    assert (x[:, 0] >= 0).all() and (x[:, 0] <= n - T - 1).all()
    x2, y2 = sample_batch(tokens, B, T, seed=7, step=3)
    assert (x2 == x).all() and (y2 == y).all()
    assert not (sample_batch(tokens, B, T, seed=7, step=4)[0] == x).all()
    assert not (sample_batch(tokens, B, T, seed=8, step=3)[0] == x).all()
    assert not (sample_batch(tokens, B, T, seed=7, step=3, stream=1)[0] == x).all()


def test_sample_batch_bounds_are_inclusive():
    T = 4
    tokens = np.arange(T + 3, dtype=np.uint16)  # offsets 0, 1, 2 are the only valid ones
    firsts = set()
    for step in range(60):
        x, y = sample_batch(tokens, 8, T, seed=0, step=step)
        firsts.update(x[:, 0].tolist())
        assert int(y.max()) <= T + 2
    assert firsts == {0, 1, 2}
    # exactly seq_len + 1 tokens: one window only
    x, y = sample_batch(np.arange(T + 1), 3, T, seed=1, step=0)
    assert (x == np.arange(T)).all() and (y == np.arange(1, T + 1)).all()
    with pytest.raises(UserError):
        sample_batch(np.arange(T), 1, T, seed=0, step=0)


# ---------------------------------------------------------------- v29's formats and tokenizer names


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.integers(0, 70_000), min_size=1, max_size=60),
       seps=st.lists(st.sampled_from([" ", "\n", "\t", "  ", " \n ", "\r\n"]), min_size=1, max_size=5),
       data=st.data())
def test_text_format_is_v29_integer_ids(values, seps, data):
    """v29's --data-format text: whitespace-separated ids, read back exactly; auto on a .txt of
    ids sniffs the same; the dtype fits the ids."""
    text = "".join(f"{v}{data.draw(st.sampled_from(seps))}" for v in values)
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "ids.txt")
        with open(p, "w") as f:
            f.write(text)
        for fmt in ("text", "auto"):
            tokens, vocab, tok = load_tokens(p, data_format=fmt)
            assert tokens.tolist() == values and vocab == max(values) + 1 and tok is None
            assert tokens.dtype == (np.uint16 if max(values) < 1 << 16 else np.int32)


@pytest.mark.parametrize("content, needles", [
    ("10,42,7\n", ["line 1", "'10,42,7'", "utf8"]),
    ("1 2\n3 4.5\n", ["line 2", "'4.5'"]),
    ("1 2 hello\n", ["'hello'", "not an integer token id"]),
    ("5 -3 2\n", ["negative token id -3", "index 1"]),
    ("1 99999999999 2", ["99999999999", "too large"]),
    ("  \n\t ", ["no token ids"]),
])
def test_text_format_mistakes_are_one_line(tmp_path, content, needles):
    p = tmp_path / "ids.dat"
    p.write_text(content)
    with pytest.raises(UserError) as e:
        load_tokens(str(p), data_format="text")
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg and all(n in msg for n in needles), msg


def test_auto_txt_sniffs_ids_or_prose_and_says_which(tmp_path):
    from dba.data import describe_data

    ids, prose = tmp_path / "ids.txt", tmp_path / "prose.txt"
    ids.write_text("10 42 7\n3\n")
    prose.write_text("chapter 10: 42 ways\n")
    assert load_tokens(str(ids))[0].tolist() == [10, 42, 7, 3]
    assert load_tokens(str(prose))[0].tolist() == list(b"chapter 10: 42 ways\n")
    assert "integer token ids" in describe_data(str(ids), "auto", None)
    assert "tokenized with byte" in describe_data(str(prose), "auto", None)
    assert describe_data(str(ids), "text", None) is None  # typed: nothing to explain
    assert describe_data(str(tmp_path / "missing.txt"), "auto", None) is None  # load_tokens says why
    # explicit utf8 reads the ids file as text
    assert load_tokens(str(ids), data_format="utf8")[0].tolist() == list(b"10 42 7\n3\n")


def test_pt_format_reads_a_saved_tensor(tmp_path):
    torch = pytest.importorskip("torch")
    p = tmp_path / "tokens.pt"
    torch.save(torch.tensor([5, 0, 7, 300], dtype=torch.int64), p)
    for fmt in ("pt", "auto"):
        tokens, vocab, tok = load_tokens(str(p), data_format=fmt)
        assert tokens.tolist() == [5, 0, 7, 300] and vocab == 301 and tok is None
    torch.save(torch.arange(6, dtype=torch.int16).reshape(2, 3), p)  # widened, flattened
    tokens = load_tokens(str(p), data_format="pt")[0]
    assert tokens.tolist() == list(range(6)) and tokens.dtype == np.int32
    torch.save({"tokens": torch.tensor([1, 2])}, p)
    with pytest.raises(UserError, match="holds a dict, not a tensor"):
        load_tokens(str(p), data_format="pt")
    torch.save(torch.tensor([0.5, 1.0]), p)
    with pytest.raises(UserError, match="float32, not integer"):
        load_tokens(str(p), data_format="pt")
    torch.save(torch.tensor([3, -1]), p)
    with pytest.raises(UserError, match="negative token id -1"):
        load_tokens(str(p), data_format="pt")


def test_tokenizer_names_and_records(tmp_path):
    from dba.data import parse_tokenizer, tokenizer_label, tokenizer_record

    for spec in ("gpt2", "tiktoken", "tiktoken:gpt2", "GPT2"):
        assert parse_tokenizer(spec) == ("tiktoken", "gpt2")
        # recorded without tiktoken or its files
        assert tokenizer_record(spec) == {"name": "tiktoken", "encoding": "gpt2", "vocab_size": 50257}
    assert parse_tokenizer("byte") == ("byte", None) and tokenizer_record("word") is None
    assert tokenizer_label(tokenizer_record("gpt2")) == "tiktoken:gpt2"
    with pytest.raises(UserError, match="only tiktoken's gpt2"):
        parse_tokenizer("tiktoken:cl100k_base")
    with pytest.raises(UserError, match="no such tokenizer.json"):
        parse_tokenizer(str(tmp_path / "nope" / "tokenizer.json"))


def test_hf_tokenizer_json(tmp_path):
    from dba.data import RecordedTokenizer, tokenizer_from_dict, tokenizer_record

    path = write_hf_tokenizer(tmp_path / "tokenizer.json")
    rec = tokenizer_record(str(tmp_path))  # a directory holding tokenizer.json names it
    assert rec["name"] == "hf" and rec["vocab_size"] == 6 and rec["path"] == str(path) and len(rec["sha256"]) == 64
    np.save(tmp_path / "ids.npy", np.array([1, 2, 3, 4, 5, 1], dtype=np.uint16))
    _, vocab, tok = load_tokens(str(tmp_path / "ids.npy"), tokenizer=str(path))
    assert vocab == 6 and isinstance(tok, RecordedTokenizer) and tok.to_dict() == rec  # recorded, not loaded
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="pip install tokenizers") as e:
            get_tokenizer(str(path))
        assert "\n" not in str(e.value)
        with pytest.raises(UserError, match="pip install tokenizers"):
            tok.load()
        return
    hf = get_tokenizer(str(path))
    assert hf.encode("hello the cat") == [1, 3, 4] and hf.vocab_size == 6
    assert "hello" in tokenizer_from_dict(rec).decode([1, 2])
    # the recorded file moved: found next to the checkpoint (search), refused when it differs
    moved = tmp_path / "run"
    moved.mkdir()
    path.rename(moved / "tokenizer.json")
    assert tokenizer_from_dict(rec, search=(str(moved),)).encode("cat") == [4]
    (moved / "tokenizer.json").write_text((moved / "tokenizer.json").read_text().replace('"cat"', '"dog"'))
    with pytest.raises(UserError, match="differs from the one the run recorded"):
        tokenizer_from_dict(rec, search=(str(moved),))


def test_token_ids_with_a_tokenizer(tmp_path):
    from dba.data import RecordedTokenizer

    p = tmp_path / "ids.npy"
    np.save(p, np.array([10, 300, 50256], dtype=np.uint16))
    _, vocab, tok = load_tokens(str(p), tokenizer="gpt2")  # GPT-2 ids: no tiktoken needed to train
    assert vocab == 50257 and isinstance(tok, RecordedTokenizer) and tok.name == "tiktoken"
    assert load_tokens(str(p), tokenizer="gpt2", vocab_size=50304)[1] == 50304
    assert load_tokens(str(p), tokenizer="word")[2] is None  # v29's default: no effect on ids
    assert load_tokens(str(p))[2] is None and load_tokens(str(p))[1] == 50257
    with pytest.raises(UserError, match="id 50256 at index 2 is outside the vocabulary of tokenizer byte"):
        load_tokens(str(p), tokenizer="byte")
    q = tmp_path / "prose.txt"
    q.write_text("some text")
    with pytest.raises(UserError, match="no word tokenizer for text"):
        load_tokens(str(q), tokenizer="word")


def test_decode_ids_marks_ids_outside_the_tokenizer():
    from dba.data import decode_ids

    assert decode_ids(get_tokenizer("byte"), [104, 105, 300, 33]) == "hi<|300|>!"
