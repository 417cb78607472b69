"""Shared fixtures: tiny simulated data sets."""

import pytest

import scverse_nullfit as snf

COVARIATES = ["age", "sex", "cell_type", "log_counts"]
DONOR_COVARIATES = ["age", "sex"]


@pytest.fixture(scope="session")
def small_adata():
    """About 300 cells from 40 related donors, 8 genes; copy it before modifying."""
    return snf.datasets.simulate(n_donors=40, cells_per_donor=8.0, n_genes=8, seed=1)


@pytest.fixture
def adata(small_adata):
    return small_adata.copy()
