"""dba prepare: sources -> a token file + sidecar, and dba train/eval reading it back.

The fast tests call the CLI in this process (`cli.main.main`) with --workers 1; the tests that
start processes (a worker pool, `dba` end to end) are slow. Expected tokens are written from the
inputs (the byte tokenizer's ids are the UTF-8 bytes; documents end with 0x03), never taken from
the code under test.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig

import numpy as np
import pytest

from cli.main import main
from dba.errors import UserError

ETX = 3  # the byte tokenizer's end of text


def prep(capsys, *args, workers: int = 1):
    """(exit code, stdout, stderr) of `dba prepare ARGS` run in this process."""
    argv = ["prepare", *map(str, args), "--progress", "off"]
    code = main(argv if "--workers" in argv else [*argv, "--workers", str(workers)])
    out = capsys.readouterr()
    return code, out.out, out.err


def ok(capsys, *args, workers: int = 1) -> str:
    code, out, err = prep(capsys, *args, workers=workers)
    assert code == 0, err
    return err


def refused(capsys, tmp_path, *args, code: int = 2) -> str:
    """A refused prepare: exit `code`, one stderr line, and the directory unchanged (no output,
    no temporary left behind)."""
    before = sorted(p.name for p in tmp_path.iterdir())
    got, out, err = prep(capsys, *args)
    assert got == code, (got, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    return err.strip()


def byte_ids(*docs: str | bytes) -> list[int]:
    out = []
    for d in docs:
        out += list(d.encode("utf-8") if isinstance(d, str) else d) + [ETX]
    return out


def read(out):
    side = json.loads(out.with_suffix(".json").read_text())
    return np.load(out), side


# ---- formats ------------------------------------------------------------------------------------


def test_text_directory_with_glob(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "b.txt").write_text("second: héllo\n")
    (src / "sub" / "a.txt").write_text("nested ✓\n")
    (src / "a.txt").write_text("first\n")
    (src / "notes.md").write_text("not matched\n")
    (src / ".hidden.txt").write_text("hidden files are skipped\n")
    out = tmp_path / "o.npy"
    ok(capsys, src, "--glob", "*.txt", "--out", out)
    tokens, side = read(out)
    assert tokens.dtype == np.uint16
    # sorted relative paths: a.txt, b.txt, sub/a.txt
    assert tokens.tolist() == byte_ids("first\n", "second: héllo\n", "nested ✓\n")
    h = hashlib.sha256()
    for rel in ("a.txt", "b.txt", "sub/a.txt"):
        h.update(rel.encode() + b"\0" + (src / rel).read_bytes())
    size = sum((src / r).stat().st_size for r in ("a.txt", "b.txt", "sub/a.txt"))
    assert side["sources"] == [{"path": str(src), "files": 3, "bytes": size, "sha256": h.hexdigest()}]
    assert (side["format"], side["documents"], side["tokens"], side["vocab_size"]) == ("dba-prepared", 3, 35, 256)
    assert side["tokenizer"] == {"name": "byte", "vocab_size": 256} and side["eot_id"] == ETX
    assert side["dtype"] == "uint16" and side["text_bytes"] == size and side["val"] is None
    assert side["command"].startswith("dba prepare ") or side["command"]
    # a pattern with a '/' matches relative paths
    out2 = tmp_path / "o2.npy"
    ok(capsys, src, "--glob", "sub/*.txt", "--out", out2)
    assert read(out2)[0].tolist() == byte_ids("nested ✓\n")


def test_jsonl_documents_and_text_field(tmp_path, capsys):
    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps({"body": "héllo", "id": 1}) + "\n\n" + json.dumps({"body": "wörld 🎉"}) + "\n")
    out = tmp_path / "o.npy"
    ok(capsys, src, "--text-field", "body", "--out", out)
    tokens, side = read(out)
    assert tokens.tolist() == byte_ids("héllo", "wörld 🎉") and side["documents"] == 2


def test_parquet_by_record_batches(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [f"row {i}: ünïcode {'x' * i}" for i in range(7)]
    table = pa.table({"id": list(range(7)), "text": docs})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=3)  # three row groups
    out = tmp_path / "o.npy"
    ok(capsys, tmp_path / "d.parquet", "--out", out)
    tokens, side = read(out)
    assert tokens.tolist() == byte_ids(*docs) and side["documents"] == 7


def _save_to_disk_layout(d, shards: list[list[str | None]]):
    """What datasets.save_to_disk writes: arrow IPC *stream* files listed in state.json (in its
    order, which is not the files' sorted order here), dataset_info.json beside them."""
    import pyarrow as pa

    d.mkdir()
    names = [f"data-{i:05d}-of-{len(shards):05d}.arrow" for i in range(len(shards))][::-1]
    for name, rows in zip(names, shards):
        table = pa.table({"text": pa.array(rows, pa.string()), "n": list(range(len(rows)))})
        with pa.OSFile(str(d / name), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
            for batch in table.to_batches(max_chunksize=2):
                w.write_batch(batch)
    (d / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names],
                                              "_fingerprint": "0", "_split": None}))
    (d / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string"}}}))
    (d / "stray.txt").write_text("not part of the dataset")


def test_saved_dataset_and_arrow_files(tmp_path, capsys):
    import pyarrow as pa

    _save_to_disk_layout(tmp_path / "ds", [["one", "two", "three"], [None, "four ✓"]])
    out = tmp_path / "o.npy"
    err = ok(capsys, tmp_path / "ds", "--out", out)
    tokens, side = read(out)
    assert tokens.tolist() == byte_ids("one", "two", "three", "four ✓")  # state.json's order, a null skipped
    assert "skipped 1 record(s) without a text field" in err and side["counts"]["no_field"] == 1
    assert side["sources"][0]["files"] == 2
    # a single .arrow file in the IPC file format
    table = pa.table({"text": ["alpha", "beta"]})
    with pa.OSFile(str(tmp_path / "f.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    out2 = tmp_path / "o2.npy"
    ok(capsys, tmp_path / "f.arrow", "--out", out2)
    assert read(out2)[0].tolist() == byte_ids("alpha", "beta")


def test_dataset_dict_asks_for_a_split(tmp_path, capsys):
    d = tmp_path / "dd"
    d.mkdir()
    (d / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    err = refused(capsys, tmp_path, d, "--out", tmp_path / "o.npy")
    assert "DatasetDict" in err and "train, test" in err


def test_long_text_is_read_in_pieces_that_split_no_character(tmp_path, capsys, monkeypatch):
    from dba import sources

    monkeypatch.setattr(sources, "PIECE_BYTES", 7)
    monkeypatch.setattr(sources, "MAX_PIECE_BYTES", 16)
    text = "ab€cd日本語🎉" * 9 + "\nshort\nline\n" + "é" * 40  # runs longer than a piece, no newline
    (tmp_path / "t.txt").write_text(text)
    (tmp_path / "u.txt").write_text("z")
    out = tmp_path / "o.npy"
    err = ok(capsys, tmp_path / "t.txt", tmp_path / "u.txt", "--out", out)
    tokens, side = read(out)
    assert tokens.tolist() == byte_ids(text, "z") and side["documents"] == 2
    assert "U+FFFD" not in err and side["counts"]["repaired_sequences"] == 0  # no piece split a character


def test_gzip_jsonl(tmp_path, capsys):
    import gzip

    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write('{"text": "zipped"}\n{"text": "too"}\n')
    out = tmp_path / "o.npy"
    ok(capsys, tmp_path / "d.jsonl.gz", "--out", out)
    assert read(out)[0].tolist() == byte_ids("zipped", "too")


# ---- tokenizers, end of text, dtype -------------------------------------------------------------


def _wordlevel(path, n_words: int, eos: str | None = "<eos>", extra_eos: str | None = None):
    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(n_words)}}
    added = []
    if eos:
        added.append({"id": len(vocab), "content": eos, "single_word": False, "lstrip": False, "rstrip": False,
                      "normalized": False, "special": True})
    if extra_eos:
        added.append({"id": len(vocab) + 1, "content": extra_eos, "single_word": False, "lstrip": False,
                      "rstrip": False, "normalized": False, "special": True})
    path.write_text(json.dumps({"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
                                "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
                                "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}}))
    return path


def test_tokenizer_json_eot_and_uint32(tmp_path, capsys):
    (tmp_path / "d.txt").write_text("w1 w69999 nope <eos> w2")
    tok = _wordlevel(tmp_path / "big.json", 70_000)  # 70,002 ids: past uint16
    out = tmp_path / "o.npy"
    err = ok(capsys, tmp_path / "d.txt", "--tokenizer", tok, "--out", out)
    tokens, side = read(out)
    # a literal "<eos>" in a document is text (split into [UNK] pieces), never the end of text
    assert tokens.dtype == np.uint32 and side["dtype"] == "uint32" and side["eot_id"] == 70_001
    assert tokens.tolist()[:3] == [2, 70_000, 0] and tokens.tolist()[-2:] == [3, 70_001]
    assert 70_001 not in tokens.tolist()[:-1] and "occurs" not in err
    assert side["tokenizer"]["sha256"] == hashlib.sha256(tok.read_bytes()).hexdigest()
    assert side["vocab_size"] == 70_002 and side["eot"] == "<eos>"
    msg = refused(capsys, tmp_path, tmp_path / "d.txt", "--tokenizer", tok, "--dtype", "uint16",
                  "--out", tmp_path / "o16.npy")
    assert "--dtype uint16" in msg and "70,002" in msg


def test_eot_from_tokenizer_config_or_flag(tmp_path, capsys):
    (tmp_path / "d.txt").write_text("w1 w2")
    d = tmp_path / "tok"
    d.mkdir()
    tok = _wordlevel(d / "tokenizer.json", 5, eos="</s>", extra_eos="<|im_end|>")
    out = tmp_path / "a.npy"
    ok(capsys, tmp_path / "d.txt", "--tokenizer", tok, "--out", out)
    assert read(out)[1]["eot"] == "</s>"
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    ok(capsys, tmp_path / "d.txt", "--tokenizer", tok, "--out", tmp_path / "b.npy")
    assert read(tmp_path / "b.npy")[1]["eot_id"] == 7
    bare = _wordlevel(tmp_path / "bare.json", 5, eos=None)
    msg = refused(capsys, tmp_path, tmp_path / "d.txt", "--tokenizer", bare, "--out", tmp_path / "c.npy")
    assert "no end-of-text token" in msg and "--eot" in msg
    ok(capsys, tmp_path / "d.txt", "--tokenizer", bare, "--eot", "[UNK]", "--out", tmp_path / "c.npy")
    assert read(tmp_path / "c.npy")[0].tolist() == [2, 3, 0]


def test_bpe_trains_round_trips_and_is_read_back(tmp_path, capsys):
    from dba.data import HFTokenizer, tokenizer_from_dict

    docs = ["def f(x):\n    return x * 2  # doubled\n", "Grüße aus Köln! 日本語のテキスト。 🎉🎉\r\n\ttab",
            "the quick brown fox jumps over the lazy dog " * 5]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "o.npy"
    ok(capsys, tmp_path / "d.jsonl", "--tokenizer", "bpe:300", "--out", out)
    tokens, side = read(out)
    path = tmp_path / "o.tokenizer.json"
    rec = side["tokenizer"]
    assert rec["name"] == "hf" and rec["path"] == str(path) and rec["vocab_size"] == side["vocab_size"] == 300
    assert rec["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert side["eot"] == "<|endoftext|>" and side["eot_id"] == 0
    tok = HFTokenizer(str(path))
    for x in ["naïve café — ½ ∑ 🎉 中文 עברית\r\n\t  spaces", "\x00\x7f control", "unseen words zyxwvut"]:
        assert tok.decode(tok.encode(x)) == x  # byte-level: any text round-trips
    ids = tokens.tolist()
    ends = [i for i, t in enumerate(ids) if t == 0]
    assert len(ends) == 3 and ends[-1] == len(ids) - 1
    starts = [0] + [e + 1 for e in ends[:-1]]
    assert [tok.decode(ids[s:e]) for s, e in zip(starts, ends)] == docs
    # the record machinery dba sample/eval use loads it back, also after the directory moves
    assert tokenizer_from_dict(rec).decode(tok.encode("round trip")) == "round trip"
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("o.npy", "o.json", "o.tokenizer.json"):
        os.replace(tmp_path / name, moved / name)
    from dba.data import load_tokens

    _, vocab, loaded = load_tokens(str(moved / "o.npy"))
    assert vocab == 300 and loaded.decode(tok.encode("moved ✓")) == "moved ✓"


def test_bpe_too_small_and_word_refused(tmp_path, capsys):
    (tmp_path / "d.txt").write_text("x")
    assert "bpe:N needs" in refused(capsys, tmp_path, tmp_path / "d.txt", "--tokenizer", "bpe:100",
                                    "--out", tmp_path / "o.npy")
    assert "word" in refused(capsys, tmp_path, tmp_path / "d.txt", "--tokenizer", "word", "--out", tmp_path / "o.npy")


# ---- the held-out split -------------------------------------------------------------------------


def test_val_split_by_document(tmp_path, capsys):
    docs = [f"doc {i}" for i in range(10)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "o.npy"
    ok(capsys, tmp_path / "d.jsonl", "--val-frac", "0.3", "--out", out)
    tokens, side = read(out)
    held = [3, 6, 9]  # every 1/0.3-th document: floor((i+1)*0.3) > floor(i*0.3)
    assert tokens.tolist() == byte_ids(*(d for i, d in enumerate(docs) if i not in held))
    val = np.load(tmp_path / "o.val.npy")
    assert val.tolist() == byte_ids(*(docs[i] for i in held))
    assert side["val"] == {"file": "o.val.npy", "tokens": len(val), "documents": 3, "by": "document", "frac": 0.3}
    assert side["documents"] == 7


def test_val_split_with_one_document_warns(tmp_path, capsys):
    (tmp_path / "d.txt").write_text("one document")
    out = tmp_path / "o.npy"
    err = ok(capsys, tmp_path / "d.txt", "--val-frac", "0.1", "--out", out)
    assert "no document was held out" in err
    assert read(out)[1]["val"] is None and not (tmp_path / "o.val.npy").exists()


def test_stdlib_corpus(tmp_path, capsys):
    out = tmp_path / "std.npy"
    ok(capsys, "--corpus", "python-stdlib", "--out", out)
    tokens, side = read(out)
    root = sysconfig.get_paths()["stdlib"]
    # independently: every .py under the stdlib, less test suites and third-party packages
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    files = sorted(p.relative_to(root).as_posix() for p in __import__("pathlib").Path(root).rglob("*.py")
                   if not skip & set(p.relative_to(root).parts[:-1]))
    assert side["corpus"]["files"] == len(files) > 300 and side["sources"][0]["files"] == len(files)
    assert not any(part in ("test", "tests", "idle_test") for f in files for part in f.split("/")[:-1])
    assert side["corpus"]["python"]["version"] == __import__("platform").python_version()
    val = side["val"]
    assert val["by"] == "file" and val["frac"] == 0.02

    def frac(rel):
        return int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big") / 2**64

    assert val["files"] == [f for f in files if frac(f) < 0.02] and 0 < len(val["files"]) < len(files) * 0.05
    content = {f: (__import__("pathlib").Path(root) / f).read_bytes() for f in files}
    assert np.load(tmp_path / "std.val.npy").tolist() == byte_ids(*(content[f] for f in val["files"] if content[f]))
    train = [content[f] for f in files if f not in val["files"] and content[f]]
    assert len(tokens) == sum(len(c) + 1 for c in train) and side["documents"] == len(train)
    assert tokens[:len(train[0]) + 1].tolist() == byte_ids(train[0])


# ---- dba train reads the sidecar ----------------------------------------------------------------


def _prepared(tmp_path, capsys, *extra, name="o.npy"):
    docs = [f"document number {i} " * 4 for i in range(30)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / name
    ok(capsys, tmp_path / "d.jsonl", "--out", out, *extra)
    return out


def test_train_data_takes_vocab_tokenizer_and_split_from_the_sidecar(tmp_path, capsys):
    from train.batches import RunData
    from train.config import DataConfig

    out = _prepared(tmp_path, capsys, "--tokenizer", "bpe:280", "--val-frac", "0.1")
    side = json.loads((tmp_path / "o.json").read_text())
    data = RunData.load(DataConfig(path=str(out)))
    assert data.vocab_size == 280 and data.tokenizer.to_dict() == side["tokenizer"]
    assert data.train.tolist() == np.load(out).tolist() and data.val.tolist() == np.load(tmp_path / "o.val.npy").tolist()
    assert data.record(str(out))["tokenizer"]["sha256"] == side["tokenizer"]["sha256"]
    # the same flags as the sidecar are accepted; v29's `word` has no effect on ids
    RunData.load(DataConfig(path=str(out), vocab_size=280, tokenizer=str(tmp_path / "o.tokenizer.json")))
    RunData.load(DataConfig(path=str(out), tokenizer="word"))
    with pytest.raises(UserError, match=r"--vocab-size 300: .*o\.npy was prepared with a vocabulary of 280"):
        RunData.load(DataConfig(path=str(out), vocab_size=300))
    with pytest.raises(UserError, match=r"--tokenizer byte: .*prepared with .*o\.tokenizer\.json"):
        RunData.load(DataConfig(path=str(out), tokenizer="byte"))


@pytest.mark.parametrize("flags,says", [(["--vocab-size", "300"], "--vocab-size 300"),
                                        (["--tokenizer", "byte"], "--tokenizer byte")])
def test_train_mismatch_is_one_line(tmp_path, capsys, flags, says):
    out = _prepared(tmp_path, capsys, "--tokenizer", "bpe:280")
    code = main(["train", "--data", str(out), *flags, "--print-config"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"dba train: error: {says}") and "Traceback" not in "".join(err)


def test_sidecar_that_does_not_match_its_file(tmp_path, capsys):
    from dba.data import load_tokens

    out = _prepared(tmp_path, capsys)
    side = json.loads((tmp_path / "o.json").read_text())
    (tmp_path / "o.json").write_text(json.dumps({**side, "tokens": side["tokens"] + 1}))
    with pytest.raises(UserError, match="do not belong together"):
        load_tokens(str(out))
    # a JSON beside an .npy that is not a sidecar is ignored
    (tmp_path / "o.json").write_text(json.dumps({"something": "else"}))
    assert load_tokens(str(out))[1] == int(np.load(out).max()) + 1  # a plain .npy: max id + 1


# ---- bad input: one line, a non-zero exit, nothing written --------------------------------------


def test_missing_source_and_bad_out(tmp_path, capsys):
    (tmp_path / "d.txt").write_text("x")
    assert "source not found" in refused(capsys, tmp_path, tmp_path / "nope.txt", "--out", tmp_path / "o.npy")
    msg = refused(capsys, tmp_path, tmp_path / "d.txt", "--out", tmp_path / "missing" / "o.npy")
    assert "does not exist" in msg and "missing" in msg
    assert "must end in .npy" in refused(capsys, tmp_path, tmp_path / "d.txt", "--out", tmp_path / "o.bin")
    assert "no files" in refused(capsys, tmp_path, tmp_path, "--glob", "*.parquet", "--out", tmp_path / "o.npy")
    assert "--workers 0" in refused(capsys, tmp_path, tmp_path / "d.txt", "--out", tmp_path / "o.npy",
                                    "--workers", "0")


def test_existing_out_needs_overwrite(tmp_path, capsys):
    (tmp_path / "d.txt").write_text("first")
    out = tmp_path / "o.npy"
    ok(capsys, tmp_path / "d.txt", "--out", out, "--val-frac", "0.5")  # one document: no val file
    (tmp_path / "o.val.npy").write_bytes(b"stale")  # a held-out file from an older run
    (tmp_path / "d.txt").write_text("second")
    msg = refused(capsys, tmp_path, tmp_path / "d.txt", "--out", out)
    assert "exists" in msg and "--overwrite" in msg
    ok(capsys, tmp_path / "d.txt", "--out", out, "--overwrite")
    assert read(out)[0].tolist() == byte_ids("second") and not (tmp_path / "o.val.npy").exists()


def test_unreadable_files_are_counted_or_fatal(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "gone.txt").symlink_to(tmp_path / "nowhere.txt")  # listed, cannot be opened (root reads chmod 000)
    msg = refused(capsys, tmp_path, src, "--out", tmp_path / "o.npy", code=1)
    assert msg.startswith("dba prepare: error: no documents") and "unreadable" in msg and "gone.txt" in msg
    (src / "ok.txt").write_text("fine")
    out = tmp_path / "o.npy"
    err = ok(capsys, src, "--out", out)
    assert "skipped 1 unreadable file(s) (first: " in err and "gone.txt" in err
    assert read(out)[0].tolist() == byte_ids("fine") and read(out)[1]["counts"]["unreadable_files"] == 1


def test_undecodable_bytes_are_repaired_and_counted(tmp_path, capsys):
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe end \xe2\x82")  # two bad bytes, a cut-off euro sign
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "j\xff"}\n')
    out = tmp_path / "o.npy"
    err = ok(capsys, tmp_path / "bad.txt", tmp_path / "bad.jsonl", "--out", out)
    assert "replaced 4 invalid UTF-8 sequence(s) with U+FFFD in 2 file(s)" in err
    fffd = "\ufffd"
    assert read(out)[0].tolist() == byte_ids(f"ok {fffd}{fffd} end {fffd}", f"j{fffd}")


def test_bad_jsonl_lines_are_counted_or_fatal(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text('{"text": "good"}\nnot json\n{"other": 1}\n[1, 2]\n{"text": 5}\n{"text": ""}\n')
    out = tmp_path / "o.npy"
    err = ok(capsys, tmp_path / "d.jsonl", "--out", out)
    assert f"skipped 1 JSONL line(s) that are not JSON (first: {tmp_path / 'd.jsonl'}:2)" in err
    assert f"skipped 3 record(s) without a text field (first: {tmp_path / 'd.jsonl'}:3)" in err
    assert "skipped 1 empty document(s)" in err
    assert read(out)[0].tolist() == byte_ids("good")
    (tmp_path / "all_bad.jsonl").write_text("nope\n{\n")
    msg = refused(capsys, tmp_path, tmp_path / "all_bad.jsonl", "--out", tmp_path / "x.npy", code=1)
    assert "no documents" in msg and "2 JSONL lines not JSON" in msg


def test_empty_sources_and_missing_column(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "empty.txt").write_text("")
    msg = refused(capsys, tmp_path, tmp_path / "empty.txt", "--out", tmp_path / "o.npy", code=1)
    assert "no documents" in msg and "1 empty documents" in msg
    pq.write_table(pa.table({"content": ["a"], "n": [1]}), tmp_path / "d.parquet")
    msg = refused(capsys, tmp_path, tmp_path / "d.parquet", "--out", tmp_path / "o.npy")
    assert "no column 'text' (columns: content, n)" in msg and "--text-field" in msg
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    assert "not text" in refused(capsys, tmp_path, tmp_path / "ints.parquet", "--out", tmp_path / "o.npy")


def test_damaged_gzip_stops_with_nothing_written(tmp_path, capsys):
    import gzip

    data = gzip.compress(b'{"text": "a"}\n' * 1000)
    (tmp_path / "d.jsonl.gz").write_bytes(data[: len(data) // 2])
    msg = refused(capsys, tmp_path, tmp_path / "d.jsonl.gz", "--out", tmp_path / "o.npy", code=1)
    assert "read failed" in msg and "d.jsonl.gz" in msg


def test_eot_inside_a_document_is_counted(tmp_path, capsys):
    (tmp_path / "d.txt").write_text("before\x03after")
    err = ok(capsys, tmp_path / "d.txt", "--out", tmp_path / "o.npy")
    assert "occurs 1 time(s) inside documents" in err


def test_interrupt_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    from dba import doc_encode, prepare

    monkeypatch.setattr(prepare, "CHUNK_BYTES", 16)
    calls = []

    def interrupted(self, chunk):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return plain(self, chunk)

    plain = doc_encode.Encoder.__call__
    monkeypatch.setattr(doc_encode.Encoder, "__call__", interrupted)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": f"doc {i} " * 5}) + "\n" for i in range(20)))
    msg = refused(capsys, tmp_path, tmp_path / "d.jsonl", "--out", tmp_path / "o.npy", "--val-frac", "0.2",
                  "--tokenizer", "bpe:260", code=130)
    assert msg == "dba prepare: interrupted" and len(calls) == 3


def test_rich_progress_draws(tmp_path, capsys):
    (tmp_path / "d.txt").write_text("x" * 1000)
    code = main(["prepare", str(tmp_path / "d.txt"), "--out", str(tmp_path / "o.npy"), "--workers", "1",
                 "--progress", "rich"])
    err = capsys.readouterr().err
    assert code == 0 and "docs/s" in err and "MB/s" in err and "tokenizing" in err


# ---- processes: the worker pool and the CLI end to end ------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("tokenizer", ["byte", "bpe:300"])
def test_same_output_with_one_or_two_workers(tmp_path, capsys, monkeypatch, tokenizer):
    from dba import prepare

    monkeypatch.setattr(prepare, "CHUNK_BYTES", 256)  # many chunks, so the pool's order is exercised
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    words = ["alpha", "béta", "γάμμα", "delta", "🎉", "\n", "def", "return"]
    for i in range(6):
        (src / f"f{i}.txt").write_text(" ".join(rng.choice(words, 300 + 50 * i)))
    (src / "g.jsonl").write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 40))}) + "\n"
                                         for _ in range(50)))
    outs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}.npy"
        ok(capsys, src, "--out", out, "--tokenizer", tokenizer, "--val-frac", "0.1", workers=workers)
        side = json.loads((tmp_path / f"w{workers}.json").read_text())
        for key in ("command",):
            side.pop(key)
        if tokenizer != "byte":
            side["tokenizer"].pop("path")
            assert (tmp_path / f"w{workers}.tokenizer.json").read_bytes() == (tmp_path / "w1.tokenizer.json").read_bytes()
        side["val"].pop("file")
        outs[workers] = (out.read_bytes(), (tmp_path / f"w{workers}.val.npy").read_bytes(), side)
    assert outs[1] == outs[2]
    assert outs[1][2]["documents"] + outs[1][2]["val"]["documents"] == 56


@pytest.mark.slow
def test_prepare_train_sample_end_to_end(tmp_path):
    """dba prepare (bpe:N, two workers) -> dba train with no vocabulary or tokenizer flag -> dba sample
    --prompt in text, through the tokenizer record the run kept."""
    from tests.support import TINY, dba, ok as ran

    docs = [f"def f{i}(x):\n    return x + {i}  # adds {i}\n" for i in range(200)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "code.npy"
    r = ran(dba("prepare", tmp_path / "d.jsonl", "--tokenizer", "bpe:300", "--val-frac", "0.1", "--out", out,
                "--workers", "2"))
    assert "held out 20 documents" in r.stdout and (tmp_path / "code.tokenizer.json").is_file()
    flags = [f for f in TINY if f not in ("--vocab-size", 97, "--data-format", "npy")]
    run = tmp_path / "run"
    r = ran(dba("train", "--data", out, *flags, "--steps", 2, "--out-dir", run))
    assert "prepared by dba prepare" in r.stdout
    meta = json.loads((run / "train.jsonl").read_text().splitlines()[0])
    assert meta["data"]["tokenizer"]["path"] == str(tmp_path / "code.tokenizer.json")
    assert meta["data"]["vocab_size"] == 300
    assert meta["data"]["val_tokens"] == json.loads((tmp_path / "code.json").read_text())["val"]["tokens"]
    r = ran(dba("sample", "--ckpt", run, "--backend", "torch", "--prompt", "def main():", "--max-new-tokens", 8,
                "--temperature", 0))
    assert r.stdout.startswith("def main():")


@pytest.mark.slow
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_signal_mid_run_leaves_nothing_behind(tmp_path, signame):
    """Ctrl-C (or a kill) while two workers tokenize: the exit status says so, and neither the
    output nor a temporary is left."""
    import signal
    import subprocess
    import sys
    import time

    from dba.bpe import train_bpe
    from tests.support import ENV, REPO

    rng = np.random.default_rng(1)
    words = np.array(["alpha", "beta", "gamma", "delta", "épsilon", "zeta", "eta", "theta", "\n"])
    text = " ".join(rng.choice(words, 1_500_000))  # ~10 MB: seconds of BPE work on two cores
    (tmp_path / "d.txt").write_text(text)
    train_bpe([text[:20000]], 300, str(tmp_path / "tok.json"))
    out = tmp_path / "out"
    out.mkdir()
    p = subprocess.Popen([sys.executable, "-m", "cli", "prepare", str(tmp_path / "d.txt"), "--tokenizer",
                          str(tmp_path / "tok.json"), "--out", str(out / "o.npy"), "--val-frac", "0.01",
                          "--workers", "2", "--progress", "off"], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not any(out.iterdir()) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # the pool is up and tokenizing
    assert p.poll() is None, p.communicate()
    p.send_signal(getattr(signal, signame))
    _, err = p.communicate(timeout=60)
    assert p.returncode == (130 if signame == "SIGINT" else 143), err
    assert "Traceback" not in err and list(out.iterdir()) == []


def test_eval_reads_the_held_out_file(tmp_path, capsys):
    """dba eval --split val on a prepared file scores its held-out documents, not a tail."""
    import argparse
    from types import SimpleNamespace

    from cli.checkpoint import run_tokens

    out = _prepared(tmp_path, capsys, "--val-frac", "0.2")
    args = argparse.Namespace(ckpt=str(tmp_path / "no-run"), data=str(out), data_format="auto",
                              data_dtype="uint16", split="val")
    tokens, source = run_tokens(args, SimpleNamespace(vocab_size=256), None)
    assert tokens.tolist() == np.load(tmp_path / "o.val.npy").tolist() and "o.val.npy" in source
    args.split = "all"
    assert run_tokens(args, SimpleNamespace(vocab_size=256), None)[0].tolist() == np.load(out).tolist()


def test_bench_input_is_jsonl_of_the_size_asked(tmp_path):
    from bench.prepare import make_jsonl

    size = make_jsonl(tmp_path / "in.jsonl", 2)
    lines = (tmp_path / "in.jsonl").read_text().splitlines()
    assert 2_000_000 <= size < 2_000_000 + max(map(len, lines)) + 1
    docs = [json.loads(line)["text"] for line in lines]
    assert len(set(docs)) == len(docs) > 100  # numbered copies: no two documents alike


@pytest.mark.slow
def test_bench_prepare_reports_each_case(tmp_path, capsys):
    from bench.prepare import main as bench_main

    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": f"line {i} ünïcode"}) + "\n" for i in range(300)))
    assert bench_main(["--src", str(tmp_path / "d.jsonl"), "--bpe", "300", "--workers", "1,2", "--repeat-min-s", "0",
                       "--json", str(tmp_path / "r.json")]) == 0
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [(r["tokenizer"], r["workers"]) for r in results] == [("byte", 1), ("byte", 2), ("bpe:300", 1),
                                                                 ("bpe:300", 2)]
    text = sum(len(f"line {i} ünïcode".encode()) for i in range(300))
    assert all(r["text_bytes"] == text and r["seconds"] > 0 and r["cpu_seconds"] > 0 for r in results)
    assert results[0]["tokens"] == text + 300 and results[2]["tokens"] == results[3]["tokens"] < text
    assert "MB/s per core" in capsys.readouterr().out
