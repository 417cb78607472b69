"""The REML's building blocks against direct computation: the Taylor tables of the functions of tau, the evaluation
at a shared tau, and the results moved to a Halley step's end point."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import scverse_nullfit as snf
from scverse_nullfit._core._design import align_grm, build_design, donor_labels, spectral_precompute
from scverse_nullfit._core._reml import RemlProblem
from scverse_nullfit._core._suffstats import pre_residualise, scaled_residual_sums, sufficient_stats

from .conftest import COVARIATES, DONOR_COVARIATES


@pytest.fixture(scope="module")
def problem_and_sums():
    adata = snf.datasets.simulate(n_donors=40, cells_per_donor=8.0, n_genes=12, seed=3)
    G, donors = align_grm(adata.uns["grm"], donor_labels(adata.obs, "donor_id"), "test")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        design = build_design(adata.obs, COVARIATES, DONOR_COVARIATES, donors)
    spectral = spectral_precompute(G, donors, design.X)
    stats = sufficient_stats(np.asarray(adata.X), np.arange(adata.n_vars), donors, design.X)
    pre = pre_residualise(stats, donors, spectral)
    ok = np.flatnonzero(pre.ok)
    Rt = np.ascontiguousarray((spectral.U.T @ scaled_residual_sums(pre, ok)).T)
    return RemlProblem(spectral), Rt, pre.W[ok]


def test_tau_functions_taylor_equal_direct(problem_and_sums):
    """Inside the nodes' range (and outside, where they are computed directly) the tables give the direct sums."""
    problem, _, _ = problem_and_sums
    tau = np.concatenate([np.geomspace(1e-9, 1e8, 61), [0.0, 0.0371, 2.5e-11, 3e7]])
    M, logdet, h, Ainv = problem.functions.at(tau)
    M0, logdet0, h0 = problem.functions.direct(tau)
    for a, rtol in enumerate((1e-14, 1e-12, 1e-10, 1e-8)):
        scale = np.abs(M0[:, a]).max(axis=(1, 2))[:, None, None]
        np.testing.assert_allclose(M[:, a] / scale, M0[:, a] / scale, rtol=0, atol=rtol, err_msg=f"M_{a}")
    # A^-1 from its own series: the inverse's rounding (eps cond(A)) either way
    A = M0[:, 0] + problem.Aw
    Ainv0 = np.linalg.inv(A)
    assert np.array_equal(Ainv, np.swapaxes(Ainv, 1, 2))
    scale = np.abs(Ainv0).max(axis=(1, 2))[:, None, None]
    err = np.abs(Ainv - Ainv0) / scale
    np.testing.assert_array_less(err.max(axis=(1, 2)), 1e-15 * np.linalg.cond(A) + 1e-13)
    # beyond tau = 100, log|A| (A losing the directions of donor-level covariates like 1/tau) carries rounding of
    # about eps cond(A) either way; so do the eigenvalues of the restricted matrix (see test_scale)
    for part, rtol in ((tau <= 100, 1.0), (tau > 100, 1e4)):
        np.testing.assert_allclose(logdet[part], logdet0[part], rtol=1e-13 * rtol, atol=1e-12, err_msg=str(rtol))
        np.testing.assert_allclose(h[part], h0[part], rtol=1e-11 * rtol, err_msg=str(rtol))


def test_shared_tau_equals_per_gene(problem_and_sums):
    """The evaluation with weights shared by groups of genes is the per-gene evaluation at the same tau."""
    problem, Rt, W = problem_and_sums
    G = len(W)
    which = np.arange(G) % 4 + 8  # grid points 8..11
    XR = Rt @ problem.Xrot
    shared = problem.evaluate_shared(problem.grid_taus, which, Rt, W, XR)
    each = problem.evaluate(problem.grid_taus[which], np.arange(G), Rt, W, XR)
    for name in ("loglik", "dloglik", "d2loglik", "d3loglik", "q", "beta", "Ainv"):
        a, b = getattr(shared, name), getattr(each, name)
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12 * np.abs(b).max(), err_msg=name)


@pytest.mark.parametrize("step", [1e-5, -3e-4, 1e-3])
def test_moved_equals_evaluation_at_the_end_point(problem_and_sums, step):
    """The results moved by a relative step follow the evaluation at the end point to about the step's cube."""
    problem, Rt, W = problem_and_sums
    G = len(W)
    rows = np.arange(G)
    XR = Rt @ problem.Xrot
    tau = np.geomspace(1e-3, 10.0, G)
    ev = problem.evaluate(tau, rows, Rt, W, XR)
    moved = ev.moved(np.ones(G, dtype=bool), step * tau, problem, tau)
    end = problem.evaluate(tau * (1 + step), rows, Rt, W, XR)
    tol = max(abs(step) ** 3, 1e-12)  # or rounding
    np.testing.assert_allclose(moved.q, end.q, rtol=tol)
    np.testing.assert_allclose(moved.loglik, end.loglik, rtol=0, atol=10 * tol * np.abs(end.loglik).max())
    for name in ("beta", "Ainv"):
        a, b = getattr(moved, name), getattr(end, name)
        scale = np.abs(b).reshape(G, -1).max(axis=1).reshape(-1, *([1] * (b.ndim - 1)))
        np.testing.assert_allclose(a / scale, b / scale, rtol=0, atol=10 * tol, err_msg=name)
    d2 = np.abs(end.d2loglik)
    np.testing.assert_allclose(moved.d2loglik, end.d2loglik, rtol=0, atol=10 * step**2 * d2.max() + 1e-12 * d2.max())


def test_tau_tables_do_not_depend_on_the_order_they_are_built(problem_and_sums):
    """A node's table is the same bits whichever nodes were asked for first (octaves are built whole)."""
    problem, _, _ = problem_and_sums
    tau = np.geomspace(1e-4, 1e3, 40)
    a = type(problem.functions)(problem.lam, problem.Xrot, problem.Aw, problem.functions.XtX)
    b = type(problem.functions)(problem.lam, problem.Xrot, problem.Aw, problem.functions.XtX)
    a.at(tau[::-1])
    b.at(tau[::7])
    b.at(tau)
    for x, y in zip(a.at(tau), b.at(tau), strict=True):
        np.testing.assert_array_equal(x, y)
