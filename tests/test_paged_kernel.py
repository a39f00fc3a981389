"""The paged decode kernel (jdisagg.model.paged_kernel), run by the Pallas interpreter on CPU:
against a float64 softmax with the context in one part and cut into several (flash-decoding),
and how many parts it picks."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jdisagg.model import paged_kernel

try:  # pytest's default import mode puts tests/ itself on sys.path
    import test_tpu_kernels
except ImportError:  # tests/ became a package
    from tests import test_tpu_kernels


@pytest.mark.parametrize("splits", [1, 2, 3, 8])
def test_decode_kernel_matches_float64(splits):
    """Rows ending mid-page, on a block edge, inside a later part, at the table's end, and a
    padding row, reading layer 1 through a table whose width is no multiple of the parts."""
    rng = np.random.default_rng(splits)
    layers, n_pages, z, k, n, h, w = 2, 48, 4, 2, 8, 16, 9
    lengths = np.array([5, 8, 0, 23, 36], np.int32)
    b = len(lengths)
    pool = (layers, n_pages, z, k, h)
    k_pages = rng.standard_normal(pool).astype(np.float32)
    v_pages = rng.standard_normal(pool).astype(np.float32)
    q = rng.standard_normal((b, n, h)).astype(np.float32)
    table = rng.permutation(np.arange(1, n_pages))[: b * w].reshape(b, w).astype(np.int32)
    got = paged_kernel.decode_attention(
        q, k_pages, v_pages, jnp.int32(1), table, lengths, pages_per_block=2, splits=splits
    )
    got = np.asarray(got)
    want = test_tpu_kernels._decode_reference(q, k_pages, v_pages, 1, table, lengths, round_kv=False)
    assert np.max(np.abs(got - want)) < 1e-5, np.max(np.abs(got - want))
    assert not got[lengths == 0].any()  # the padding row read nothing


def test_splits_for(monkeypatch):
    monkeypatch.setattr(paged_kernel, "SPLITS", 0)
    monkeypatch.setattr(paged_kernel, "MIN_PROGRAMS", 1024)
    assert paged_kernel.splits_for(16 * 8, 128, 2) == 8  # 8 parts of 16 pages
    assert paged_kernel.splits_for(32 * 8, 128, 2) == 4
    assert paged_kernel.splits_for(64 * 8, 128, 2) == 1  # half of MIN_PROGRAMS: unsplit
    assert paged_kernel.splits_for(8, 8, 4) == 2  # at most one block per part
    monkeypatch.setattr(paged_kernel, "SPLITS", 4)
    assert paged_kernel.splits_for(256 * 8, 128, 2) == 4
    assert paged_kernel.splits_for(256 * 8, 4, 4) == 1
