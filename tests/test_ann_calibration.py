"""How the ANN index picks ``nprobe`` and the queries it calibrates on (issue 16).

The search strategy is checked on a stand-in index whose recall is a step of ``nprobe`` (no
useful rows below ``need`` lists, the exact top-k from ``need`` on), so which ``nprobe`` the
documented rule picks -- the smallest power of two reaching the target, refined in quarter steps
below it, at least ``nlist / 32`` -- can be worked out by hand.
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_cellclip import ann

pytest.importorskip("faiss")


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class StepIndex:
    """Finds the true top-k once ``nprobe >= need``, the k worst rows below that."""

    def __init__(self, x, need):
        self.x, self.need, self.nprobe = x, need, 1

    def search(self, q, k):
        s = q @ self.x.T
        order = np.argsort(-s, axis=1, kind="stable")
        rows = order[:, :k] if self.nprobe >= self.need else order[:, -k:]
        return np.take_along_axis(s, rows, 1), rows


@pytest.fixture(scope="module")
def x():
    return _unit(np.random.default_rng(0).standard_normal((400, 8)))


def _calibrate(x, need, nlist, target=ann.TARGET_RECALL):
    return ann._calibrate_nprobe(StepIndex(x, need), x, np.random.default_rng(0), nlist=nlist, k=10,
                                 n_calibration=40, target_recall=target)


@pytest.mark.parametrize("need,nlist,expected", [
    (10, 64, 10),    # 1, 2, 4, 8 miss, 16 reaches: refined over 8, 10, 12, 14 -> 10
    (11, 64, 12),    # ... -> 12 (the grid is in quarter steps, not every integer)
    (3, 64, 3),      # 1, 2 miss, 4 reaches: refined over 2, 2.5, 3, 3.5 -> 3
    (50, 64, 56),    # only all 64 lists reach: refined below them over 32, 40, 48, 56 -> 56
    (2, 128, 4),     # 2 lists would do, but at least 128 / 32 = 4 are probed
    (1, 16, 1),      # small nlist: floor 0, one list
    (20, 48, 20),    # nlist not a power of two: 32 reaches, refined over 16, 20, 24, 28 -> 20
])
def test_smallest_grid_nprobe_reaching_the_target(x, need, nlist, expected):
    chosen, reached = _calibrate(x, need, nlist)
    assert chosen == expected
    assert reached == 1.0


def test_unreachable_target_probes_every_list(x):
    assert _calibrate(x, need=10**6, nlist=64) == (64, 1.0)
    assert _calibrate(x, need=10**6, nlist=100)[0] == 100


def test_a_target_of_exactly_1_is_reached(x):
    """recall 1.0 meets a target of 1.0 (not only a higher one), in the doubling and in the refinement."""
    assert _calibrate(x, need=10, nlist=64, target=1.0) == (10, 1.0)
    assert _calibrate(x, need=16, nlist=64, target=1.0) == (16, 1.0)


def test_real_index_with_an_unreachable_target_reports_exact_recall():
    """All lists probed = an exhaustive search: the recorded recall is 1.0, whatever the target."""
    xx = _unit(np.random.default_rng(1).standard_normal((2000, 16)))
    idx = ann.build_index(xx, nlist=32, target_recall=1.5, use_gpu=False)
    assert idx.nprobe == 32
    assert idx.meta["calibration_recall"] == 1.0


def test_target_1_on_a_real_index_is_the_smallest_perfect_nprobe():
    rng = np.random.default_rng(2)
    centres = rng.standard_normal((20, 16))
    xx = _unit(centres[rng.integers(0, 20, 3000)] + 0.4 * rng.standard_normal((3000, 16)))
    idx = ann.build_index(xx, nlist=64, target_recall=1.0, n_calibration=50, use_gpu=False)
    assert idx.meta["calibration_recall"] == 1.0
    assert 2 < idx.nprobe < 64  # a perfect recall long before every list is probed


# ---------------------------------------------------------------------- the calibration queries
def test_calibration_queries_are_each_stored_row_once_half_near_half_far():
    """On 64 orthonormal rows: query j is row j plus noise (every row once, in row order); even
    queries carry noise of norm ~0.5 (cosine to their row ~0.89), odd ones ~1.2 (cosine ~0.64)."""
    x = np.eye(64, dtype=np.float32)
    q = ann._calibration_queries(x, 64, np.random.default_rng(3))
    assert q.shape == (64, 64)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-6)
    cos = q @ x.T
    assert (np.argmax(cos, axis=1) == np.arange(64)).all()
    own = np.diag(cos)
    near, far = own[0::2], own[1::2]
    assert 0.86 < near.mean() < 0.92 and near.min() > 0.8, near
    assert 0.58 < far.mean() < 0.70 and far.max() < 0.85, far


def test_fewer_queries_than_rows_use_distinct_rows():
    x = np.eye(64, dtype=np.float32)
    q = ann._calibration_queries(x, 32, np.random.default_rng(4))
    base = np.argmax(q @ x.T, axis=1)
    assert len(q) == 32 and (np.diff(base) > 0).all()  # 32 different rows, in row order


def test_calibration_queries_have_unit_norm():
    x = _unit(np.random.default_rng(5).standard_normal((600, 64)))
    q = ann._calibration_queries(x, 500, np.random.default_rng(6))
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-6)
