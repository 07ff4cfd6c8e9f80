"""JAX vs PyTorch: logits and gradients over the configuration matrix (fp32, CPU)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.support import first_of_each, tiered
from bench.parity_cases import (build_jax, build_torch, config_matrix, grad_errors, jax_grads_canonical, random_state,
                                 random_tokens)

MATRIX = config_matrix()


def test_matrix_covers_every_mode_and_option():
    assert len(MATRIX) >= 24
    cfgs = [c for _, c in MATRIX]
    for mode in ("standard", "bottleneck", "decoupled", "gqa"):
        of_mode = [c for c in cfgs if c.attn_mode == mode]
        assert any(c.tie_qk for c in of_mode) and any(c.null_attn for c in of_mode)
        assert any(not c.rope for c in of_mode) and any(not c.learned_temp for c in of_mode)
        assert any(c.mlp == "gelu" for c in of_mode) and any(c.embed_dim != c.d_model for c in of_mode)
        # the pretrained families' options (SPEC §8)
        assert any(c.norm == "rmsnorm" for c in of_mode) and any(c.qkv_bias and c.out_bias and c.mlp_bias for c in of_mode)
        assert any(not c.tie_embeddings for c in of_mode) and any(c.rope_type == "llama3" for c in of_mode)
        assert any(c.tie_qk and c.qkv_bias for c in of_mode)
    # an upcycled student's options: grouped decoupled keys, recorded frequencies, and both together
    dec = [c for c in cfgs if c.attn_mode == "decoupled"]
    assert any(c.n_kv_head < c.n_head for c in dec) and any(c.rope_freqs is not None for c in dec)
    assert any(c.n_kv_head < c.n_head and c.rope_freqs is not None and c.null_attn for c in dec)


# the fast tier runs the first configuration of each attention mode, the full suite all of them
@pytest.mark.parametrize("name,cfg", tiered(MATRIX, first_of_each(lambda case: case[1].attn_mode),
                                            ids=[n for n, _ in MATRIX]))
def test_logits_and_grads_match(name, cfg):
    state = random_state(cfg, seed=zlib.crc32(name.encode()) % 1000)  # fixed per configuration, every run
    tokens = random_tokens(cfg, 2, 17)
    targets = random_tokens(cfg, 2, 17, seed=2)
    tm, jm = build_torch(cfg, state), build_jax(cfg, state)

    logits_t = tm(tokens)
    logits_j = np.asarray(jm(tokens))
    lt = logits_t.detach().numpy()
    assert 0.3 < np.abs(lt).max() < 30, "weights should give logits of order 1"
    assert np.abs(lt - logits_j).max() <= 2e-5

    loss_t = F.cross_entropy(logits_t.reshape(-1, cfg.vocab_size), torch.as_tensor(targets).reshape(-1))
    tm.zero_grad()
    loss_t.backward()
    loss_j, grads_j = jax_grads_canonical(jm, tokens, targets)
    assert abs(loss_j - loss_t.item()) <= 1e-5 * abs(loss_t.item())
    named = dict(tm.named_parameters(remove_duplicate=False))
    torch_grads = {k: p.grad.numpy() for k, p in named.items() if p.grad is not None}
    for key, rel in grad_errors(cfg, torch_grads, grads_j).items():
        assert rel is None or rel <= 1e-4, f"{key}: relative gradient error {rel:.2e}"
