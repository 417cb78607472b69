"""A deterministic simulator of single-cell expression from related donors."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData


def _family_genotypes(
    rng: np.random.Generator, n_donors: int, n_snps: int, freq: np.ndarray | None = None
) -> np.ndarray:
    """Dosages (donors x snps) of nuclear families (two parents and their children) and unrelated singletons;
    founder allele frequencies ``freq`` (default uniform on 0.05-0.5)."""
    freq = rng.uniform(0.05, 0.5, n_snps) if freq is None else np.asarray(freq, dtype=np.float64)

    def founder():
        return rng.random((2, n_snps)) < freq  # two haplotypes

    haplotypes = []
    while len(haplotypes) < n_donors:
        size = rng.choice([1, 3, 4, 5], p=[0.4, 0.2, 0.25, 0.15])
        if size == 1:
            haplotypes.append(founder())
        else:
            mother, father = founder(), founder()
            haplotypes += [mother, father]
            for _ in range(size - 2):
                pick_m = rng.integers(0, 2, n_snps)
                pick_f = rng.integers(0, 2, n_snps)
                cols = np.arange(n_snps)
                haplotypes.append(np.stack([mother[pick_m, cols], father[pick_f, cols]]))
    return np.stack([h.sum(axis=0) for h in haplotypes[:n_donors]]).astype(np.float64)


def standardised_grm(dosage: np.ndarray) -> np.ndarray:
    """GCTA-style GRM from a donors x variants dosage matrix (monomorphic variants skipped)."""
    freq = dosage.mean(axis=0) / 2
    keep = (freq > 0) & (freq < 1)
    Zs = (dosage[:, keep] - 2 * freq[keep]) / np.sqrt(2 * freq[keep] * (1 - freq[keep]))
    return Zs @ Zs.T / keep.sum()


def simulate(
    *,
    n_donors: int = 100,
    cells_per_donor: float = 20.0,
    n_genes: int = 100,
    n_single_cell_donors: int = 3,
    frac_null: float = 0.3,
    h2_range: tuple[float, float] = (0.05, 0.6),
    n_snps: int = 2000,
    n_cis_variants: int = 20,
    seed: int = 0,
    frac_eqtl: float = 0.0,
    eqtl_effect: float = 0.5,
) -> AnnData:
    """Simulate a single-cell data set with related donors under the null model of :func:`~scverse_nullfit.tl.fit_null`.

    Donors come in nuclear families and as unrelated singletons, so the GRM (computed from simulated genotypes,
    GCTA-style) has real off-diagonal structure. Each gene has its own true ``tau``: a fraction ``frac_null``
    of genes has ``tau = 0``, the others a heritability drawn uniformly from ``h2_range``.

    Parameters
    ----------
    n_donors
        Number of donors.
    cells_per_donor
        Mean cells per donor (negative binomial, at least one).
    n_genes
        Number of genes.
    n_single_cell_donors
        Donors forced to have exactly one cell.
    frac_null
        Fraction of genes simulated with ``tau = 0``.
    h2_range
        Range of the true heritability ``tau / (1 + tau)`` of the other genes.
    n_snps
        Number of genome-wide variants used for the GRM.
    n_cis_variants
        Number of variants simulated around each gene (for step-2 tests); stored in ``uns["genotypes"]``.
    seed
        Seed of the random generator; the output is a deterministic function of the arguments.
    frac_eqtl
        Fraction of genes given one causal cis-eQTL among their own ``n_cis_variants`` variants (default none).
        The causal variant adds ``eqtl_effect * sqrt(true_sigma2_e)`` per allele (centred dosage) to every cell
        of its donor. Drawn from a separate random stream, so everything else is the same as with
        ``frac_eqtl=0``, which is the default output exactly.
    eqtl_effect
        Effect per allele of a causal variant, in units of the gene's residual standard deviation.

    Returns
    -------
    Cells x genes AnnData with float32 expression in ``X`` and raw counts in ``layers["counts"]`` (CSR, for the
    count families with ``offset="log_counts"``; see ``_simulate_counts``); ``obs`` holds ``donor_id`` and
    covariates (donor-level ``age``, ``sex``; cell-level ``cell_type``, ``log_counts``); ``var`` holds the truth
    (``true_tau``, ``true_h2``, ``true_sigma2_e``, ``true_sigma2_g``, and ``true_count_sigma2_g``,
    ``true_count_theta`` of the counts) and gene positions (``chrom``, ``start``);
    ``uns["grm"]`` the donor GRM and ``uns["genotypes"]`` a donors x variants dosage DataFrame with
    ``uns["variants"]`` their positions. With ``frac_eqtl > 0``, ``var`` also holds ``eqtl_variant`` (the causal
    variant's name, ``""`` for none) and ``eqtl_beta`` (its effect per allele, 0 for none).
    """
    if not 0.0 <= frac_eqtl <= 1.0:
        raise ValueError(f"frac_eqtl must be within [0, 1], not {frac_eqtl!r}.")
    rng = np.random.default_rng(seed)
    dosage = _family_genotypes(rng, n_donors, n_snps)
    G = standardised_grm(dosage)
    donor_ids = np.array([f"D{i:04d}" for i in range(n_donors)])

    p_nb = 0.5
    counts = 1 + rng.negative_binomial(n=max(cells_per_donor - 1, 1e-3) * p_nb / (1 - p_nb), p=p_nb, size=n_donors)
    single = rng.choice(n_donors, size=min(n_single_cell_donors, n_donors), replace=False)
    counts[single] = 1
    codes = np.repeat(np.arange(n_donors), counts)
    N = len(codes)

    age = rng.uniform(20, 80, n_donors)
    sex = rng.choice(["F", "M"], n_donors)
    cell_types = np.array(["B", "CD4T", "CD8T", "NK"])
    cell_type = rng.choice(cell_types, N, p=[0.2, 0.4, 0.25, 0.15])
    log_counts = rng.normal(8.0, 0.4, N)
    obs = pd.DataFrame(
        {
            "donor_id": pd.Categorical(donor_ids[codes], categories=donor_ids),
            "age": age[codes],
            "sex": pd.Categorical(sex[codes], categories=["F", "M"]),
            "cell_type": pd.Categorical(cell_type, categories=cell_types),
            "log_counts": log_counts,
        },
        index=[f"cell{i:06d}" for i in range(N)],
    )
    X = np.column_stack(
        [
            np.ones(N),
            (obs["age"].to_numpy() - 50) / 20,
            (obs["sex"] == "M").to_numpy(float),
            *[(obs["cell_type"] == ct).to_numpy(float) for ct in cell_types[1:]],
            obs["log_counts"].to_numpy() - 8.0,
        ]
    )

    null = rng.random(n_genes) < frac_null
    h2 = np.where(null, 0.0, rng.uniform(*h2_range, n_genes))
    tau = h2 / (1 - h2)
    s2e = rng.uniform(0.5, 2.0, n_genes)
    s2g = tau * s2e
    beta = np.column_stack([rng.uniform(0.5, 3.0, n_genes), rng.normal(0, 0.3, (n_genes, X.shape[1] - 1))])

    w, V = np.linalg.eigh(G)
    Lg = V * np.sqrt(np.clip(w, 0, None))
    u = (Lg @ rng.standard_normal((n_donors, n_genes))) * np.sqrt(s2g)
    Y = X @ beta.T + u[codes] + rng.standard_normal((N, n_genes)) * np.sqrt(s2e)

    chrom = rng.choice(["1", "2", "3"], n_genes)
    start = rng.integers(1_000_000, 50_000_000, n_genes)
    var = pd.DataFrame(
        {"true_tau": tau, "true_h2": h2, "true_sigma2_e": s2e, "true_sigma2_g": s2g, "chrom": chrom, "start": start},
        index=[f"gene{j:05d}" for j in range(n_genes)],
    )

    geno, variants = _cis_variants(rng, dosage, var, n_cis_variants)
    if frac_eqtl > 0 and n_cis_variants > 0:
        Y, var = _add_eqtls(np.random.default_rng([seed, 1]), Y, codes, var, geno, variants, frac_eqtl, eqtl_effect)

    counts, count_truth = _simulate_counts(np.random.default_rng([seed, 2]), X, codes, Lg, n_genes)
    var = var.assign(**count_truth)

    adata = AnnData(X=Y.astype(np.float32), obs=obs, var=var, layers={"counts": counts})
    adata.uns["grm"] = pd.DataFrame(G, index=donor_ids, columns=donor_ids)
    adata.uns["genotypes"] = pd.DataFrame(geno, index=donor_ids, columns=variants.index)
    adata.uns["variants"] = variants
    return adata


def _simulate_counts(rng: np.random.Generator, X: np.ndarray, codes: np.ndarray, Lg: np.ndarray, n_genes: int):
    """Raw counts from the negative-binomial mixed model (a separate random stream, so ``X`` is unchanged).

    ``log mu = (log_counts - 8) + b0 + small covariate effects + u``, ``u ~ N(0, sigma2_g GRM)`` with 30% of genes
    at ``sigma2_g = 0`` and the others uniform on [0.05, 0.5]; ``theta`` uniform on [1, 10]. Returns the counts
    (CSR, float32) and the truth columns ``true_count_sigma2_g`` and ``true_count_theta`` for ``var``.
    """
    from scipy import sparse

    s2g = np.where(rng.random(n_genes) < 0.3, 0.0, rng.uniform(0.05, 0.5, n_genes))
    theta = rng.uniform(1.0, 10.0, n_genes)
    b = np.column_stack([rng.uniform(-1.5, 1.5, n_genes), rng.normal(0, 0.1, (n_genes, X.shape[1] - 2))])
    u = (Lg @ rng.standard_normal((Lg.shape[0], n_genes))) * np.sqrt(s2g)
    eta = X[:, -1:] + X[:, :-1] @ b.T + u[codes]
    mu = np.exp(eta)
    counts = rng.poisson(rng.gamma(theta, mu / theta)).astype(np.float32)
    return sparse.csr_matrix(counts), {"true_count_sigma2_g": s2g, "true_count_theta": theta}


def _cis_variants(rng: np.random.Generator, dosage: np.ndarray, var: pd.DataFrame, per_gene: int):
    """Variants placed around each gene's start, with genotypes drawn from the GRM's own (related) donors."""
    n_snps = dosage.shape[1]
    cols, chrom, pos, names = [], [], [], []
    for gene, (c, s) in zip(var.index, var[["chrom", "start"]].itertuples(index=False), strict=True):
        picks = rng.choice(n_snps, per_gene, replace=False)
        offsets = np.sort(rng.integers(-900_000, 900_000, per_gene))
        for k, (snp, off) in enumerate(zip(picks, offsets, strict=True)):
            cols.append(snp)
            chrom.append(c)
            pos.append(int(s + off))
            names.append(f"{gene}_v{k}")
    geno = dosage[:, cols] if cols else np.zeros((dosage.shape[0], 0))
    variants = pd.DataFrame(
        {"chrom": chrom, "pos": np.asarray(pos, dtype=np.int64)}, index=pd.Index(names, name="variant")
    )
    return geno, variants


def _add_eqtls(rng, Y, codes, var, geno, variants, frac, effect):
    """Give a fraction of genes one causal variant among their own cis variants (a separate random stream)."""
    n_genes = var.shape[0]
    n_eqtl = round(frac * n_genes)
    chosen = np.sort(rng.choice(n_genes, size=n_eqtl, replace=False))
    per_gene = geno.shape[1] // n_genes
    names = np.full(n_genes, "", dtype=object)
    betas = np.zeros(n_genes)
    Y = Y.copy()
    for j in chosen:
        cols = np.arange(j * per_gene, (j + 1) * per_gene)
        maf = np.minimum(geno[:, cols].mean(axis=0), 2 - geno[:, cols].mean(axis=0)) / 2
        candidates = cols[maf >= 0.1] if (maf >= 0.1).any() else cols[[int(np.argmax(maf))]]
        k = int(rng.choice(candidates))
        beta = effect * np.sqrt(var["true_sigma2_e"].iloc[j])
        g = geno[:, k] - geno[:, k].mean()
        Y[:, j] += beta * g[codes]
        names[j] = variants.index[k]
        betas[j] = beta
    var = var.assign(eqtl_variant=names.astype(str), eqtl_beta=betas)
    return Y, var


def example() -> AnnData:
    """The built-in example: 150 related donors, about 3,000 cells, 200 genes, 5 variants per gene.

    See :func:`simulate` for what it holds.
    """
    return simulate(n_donors=150, cells_per_donor=20.0, n_genes=200, n_cis_variants=5, seed=2026)
