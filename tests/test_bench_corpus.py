"""`dba bench corpus`'s arithmetic: the summed NLL over windows and the held-out bytes it turns
into bits per byte (the three training runs themselves are the bench, not a test)."""

from __future__ import annotations

import json

import numpy as np

from bench import corpus as bcorpus
from bench.parity_cases import build_jax, make_config, random_state


def test_windows_nats_is_the_cross_entropy_of_each_window():
    import jax
    import optax

    cfg = make_config("decoupled", vocab_size=37, block_size=64)
    model = build_jax(cfg, random_state(cfg, seed=3))
    ids = np.random.default_rng(0).integers(0, 37, 2 * 19 * 16 + 40).astype(np.int64)  # 2 batches of 16, a tail
    total, scored = bcorpus._windows_nats(model, ids, 19)
    n = (len(ids) - 1) // 19
    assert scored == n * 19
    want = 0.0
    for j in range(n):
        x = ids[j * 19:(j + 1) * 19 + 1]
        logits = model(x[None, :-1])[0]
        want += float(optax.softmax_cross_entropy_with_integer_labels(logits, jax.numpy.asarray(x[1:])).sum())
    np.testing.assert_allclose(total, want, rtol=1e-5)


def test_held_out_bytes_count_the_held_out_files(tmp_path):
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "a.py").write_bytes(b"x" * 11)
    (root / "pkg" / "b.py").write_text("é\n", encoding="utf-8")  # 3 bytes
    (tmp_path / "c.json").write_text(json.dumps({"val": {"tokens": 17, "files": ["a.py", "pkg/b.py"]},
                                                 "corpus": {"python": {"stdlib": str(root)}}}))
    assert bcorpus._held_out_bytes(tmp_path / "c.npy") == (17, 14)


def test_a_dir_that_cannot_be_made_is_one_line(tmp_path):
    import argparse

    import pytest

    from bench import upcycle as bupcycle
    from dba.errors import UserError

    taken = tmp_path / "a_file"
    taken.write_text("x")
    from bench import upcycle_shapes as bshapes

    for module in (bcorpus, bupcycle, bshapes):
        with pytest.raises(UserError, match="a_file.*cannot make the working directory"):
            module.run(argparse.Namespace(dir=str(taken), bpe=2048, json=None, teacher_steps=1, budget="1/8",
                                          model="smollm-135m", layers=1))
    assert taken.read_text() == "x"
    with pytest.raises(UserError, match="--budget 'abc'"):
        bshapes.run(argparse.Namespace(dir=None, budget="abc", model="smollm-135m", layers=1))
