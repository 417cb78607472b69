"""The argument parser (imports only argparse, so that ``--help`` and ``--version`` are fast)."""

from __future__ import annotations

import argparse

from .._version import __version__
from ._common import PROG

TRAIT_TYPES = ("quantitative", "count")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    verbosity = common.add_argument_group("output and logging").add_mutually_exclusive_group()
    verbosity.add_argument("--quiet", "-q", action="store_true", help="Print errors only (no log, summary or bar).")
    verbosity.add_argument("--debug", action="store_true", help="Debug log with stage timings; tracebacks on error.")

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Exact, fast null linear mixed models (donor random effect with a GRM) for single-cell eQTL.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    fit = sub.add_parser(
        "fit-null",
        parents=[common],
        help="Fit the null model of every gene and write a copy of the input with the results.",
        description=(
            "Fit the null linear mixed model of every gene of INPUT.h5ad by exact REML and write a copy of it, with "
            "the results in varm/uns, to OUTPUT. INPUT is never modified. Instead of INPUT, use --example (the "
            "built-in simulated data) or --pheno-covar-file (a TSV with one row per cell, as the Rust "
            "step1-fit-null tool reads)."
        ),
    )
    fit.add_argument("input", nargs="?", metavar="INPUT.h5ad", help="Input AnnData (cells x genes).")
    fit.add_argument("-o", "--output", required=True, metavar="OUTPUT.h5ad", help="Output h5ad (written atomically).")
    fit.add_argument("--overwrite", action="store_true", help="Replace OUTPUT if it exists.")
    fit.add_argument(
        "--backed",
        action="store_true",
        help="Open INPUT read-only in backed mode: X stays on disk during the fit (less memory for large files).",
    )
    add_model_args(fit)
    fit.add_argument(
        "--example", action="store_true", help="Fit the built-in example (snf.datasets.example()) instead of INPUT."
    )
    tsv = fit.add_argument_group(
        "phenotype table input (flags of the Rust step1-fit-null tool)",
        "A TSV (or CSV) with one row per cell: a sample (donor) ID column, trait columns and covariate columns. "
        "The traits become the genes of the output's X; --covariate-cols, --donor-covariate-cols and --grm-file "
        "are aliases of --covariates, --donor-covariates and --grm.",
    )
    tsv.add_argument("--pheno-covar-file", metavar="FILE.tsv", help="Table of phenotypes and covariates.")
    tsv.add_argument("--trait-name", action="append", metavar="T1[,T2...]", help="Trait column(s) to fit.")
    tsv.add_argument("--sample-id-col", metavar="COL", help="Column of donor IDs (alias of --donor-key).")
    tsv.add_argument("--cell-id-col", metavar="COL", help="Optional column of cell IDs (the output's obs_names).")
    tsv.add_argument(
        "--trait-type",
        choices=TRAIT_TYPES,
        default=None,
        help="'quantitative' (linear mixed model, the default) or 'count' (same as --family poisson).",
    )

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="Run the whole fit on the built-in example and compare it with the simulated truth.",
        description="Same as `fit-null --example`, with OUTPUT optional.",
    )
    demo.add_argument("-o", "--output", metavar="OUTPUT.h5ad", help="Also write the fitted example here.")
    demo.add_argument("--overwrite", action="store_true", help="Replace OUTPUT if it exists.")
    demo.add_argument("--n-threads", type=int, metavar="N", help="Limit on BLAS threads.")
    demo.add_argument("--key-added", default="nullfit", metavar="K", help="Key of the results (default: nullfit).")
    add_step2_commands(sub, common)
    export = sub.add_parser(
        "export-tensorqtl",
        parents=[common],
        help="Write stored cis (and trans) results as tensorQTL's files.",
        description=(
            "Write the cis_map results of RESULTS.h5ad as tensorQTL writes them: PREFIX.cis_qtl_pairs.CHROM.parquet "
            "per chromosome (nominal pairs), PREFIX.cis_qtl.txt.gz (one row per gene), "
            "PREFIX.cis_independent_qtl.txt.gz when the results hold independent signals, and with --trans-key "
            "PREFIX.trans_qtl_pairs.parquet. All files are written to temporary names and renamed only when all are "
            "complete. Needs pyarrow (pip install 'scverse-nullfit[parquet]')."
        ),
    )
    export.add_argument("input", metavar="RESULTS.h5ad", help="An h5ad with cis_map (or trans) results.")
    export.add_argument("prefix", metavar="PREFIX", help="Output prefix (its folder must exist).")
    export.add_argument("--key", default="cis", metavar="K", help="Key of the cis_map results (default: cis).")
    export.add_argument("--trans-key", metavar="K", help="Also export the trans results stored under this key.")
    export.add_argument("--no-cis", action="store_true", help="Export only the trans results.")
    export.add_argument("--overwrite", action="store_true", help="Replace existing output files.")
    return parser


GENOTYPES_HELP = (
    "Dosages of the donors: VCF/BCF (.vcf, .vcf.gz, .bcf; DS, else GT), PLINK 2 (.pgen), BGEN (.bgen with its "
    ".sample), PLINK 1 (.bed, or a prefix), or a donors x variants .h5ad. Dosages count the ALT allele; donors "
    "are matched by sample ID."
)


def add_step2_commands(sub, common: argparse.ArgumentParser) -> None:
    """``score-test``, ``cis-map`` and ``trans-map``."""
    score = sub.add_parser(
        "score-test",
        parents=[common],
        help="Score-test every variant of a genotype file against every fitted gene; write a table.",
        description=(
            "Exact score test of every variant of GENOTYPES against the null model of every gene fitted in "
            "FITTED.h5ad (the output of fit-null): one row per gene and variant (gene, variant, score, score_var, "
            "z, pval, beta, se), written to RESULTS (.tsv, .tsv.gz or .parquet, by suffix) atomically. Memory "
            "holds genes x variants results; for genome-wide scans of many genes use cis-map."
        ),
    )
    cis = sub.add_parser(
        "cis-map",
        parents=[common],
        help="Map cis-eQTLs: test the variants near each gene, combine them per gene (ACAT); write tables.",
        description=(
            "Test every fitted gene of FITTED.h5ad against the variants of GENOTYPES within --window bp of its "
            "position (var columns --chrom-key/--pos-key), and write the per-variant table (gene, variant, chrom, "
            "pos, distance and the score-test columns) to RESULTS and, with --genes-output, the per-gene summary "
            "(ACAT and top-variant p-values). A VCF/BCF must be indexed (.tbi/.csi): only the genes' windows are "
            "read from it."
        ),
    )
    trans = sub.add_parser(
        "trans-map",
        parents=[common],
        help="Scan every variant against every fitted gene in bounded memory; write the pairs below a p-value.",
        description=(
            "Score-test every variant of GENOTYPES against every gene fitted in FITTED.h5ad, streaming the variants "
            "in chunks, and write the (gene, variant) pairs with p < --pval-threshold to RESULTS; with "
            "--genes-output / --variants-output, also each gene's / variant's smallest p-value. Memory does not "
            "grow with genes x variants."
        ),
    )
    for p in (score, cis, trans):
        p.add_argument("input", metavar="FITTED.h5ad", help="The output of fit-null (never modified).")
        p.add_argument("genotypes", metavar="GENOTYPES", help=GENOTYPES_HELP)
        p.add_argument(
            "-o", "--output", required=True, metavar="RESULTS.tsv", help="Output table: .tsv, .tsv.gz or .parquet."
        )
        p.add_argument("--overwrite", action="store_true", help="Replace existing output files.")
        p.add_argument("--key", default="nullfit", metavar="K", help="Key of the fit (fit-null --key-added; nullfit).")
        p.add_argument("--genes", metavar="FILE_OR_LIST", help="Genes to test: a file (one per line) or a comma list.")
        p.add_argument("--chunk-size", type=int, metavar="N", help="Variants per chunk (default: bounded memory).")
        p.add_argument("--n-threads", type=int, metavar="N", help="Limit on BLAS threads.")
        p.add_argument(
            "--no-spa",
            dest="spa",
            action="store_false",
            help="Count fits: normal p-values everywhere (default: saddlepoint p-values where |z| > 2).",
        )
    for p in (cis, trans):
        p.add_argument(
            "--variant-positions",
            metavar="FILE.tsv",
            help=(
                "Variant positions: a TSV (or CSV) whose first column is the variant ID, with chromosome and "
                "position columns; default: the genotype file's own (or the genotype .h5ad's var)."
            ),
        )
    score.add_argument(
        "--max-tests",
        type=int,
        default=100_000_000,
        metavar="N",
        help="Refuse to run when genes x variants exceeds N (default 1e8; the table is held in memory; 0: no limit).",
    )
    score.add_argument(
        "--condition",
        metavar="FILE_OR_LIST",
        help="Variant IDs of GENOTYPES to condition on (exact conditional score test): a file or a comma list.",
    )
    t = trans.add_argument_group("trans scan")
    t.add_argument(
        "--pval-threshold", type=float, default=1e-5, metavar="P", help="Keep pairs with p below P (default 1e-5)."
    )
    t.add_argument("--genes-output", metavar="GENES.tsv", help="Also write each gene's smallest p-value and variant.")
    t.add_argument("--variants-output", metavar="VARIANTS.tsv", help="Also write each variant's smallest p-value.")
    t.add_argument(
        "--tensorqtl",
        metavar="PREFIX",
        help="Also write the kept pairs as tensorQTL writes them: PREFIX.trans_qtl_pairs.parquet (needs pyarrow).",
    )
    g = cis.add_argument_group("cis windows")
    g.add_argument("--window", type=int, default=1_000_000, metavar="BP", help="Half-width in bp (default 1000000).")
    g.add_argument("--genes-output", metavar="GENES.tsv", help="Also write the per-gene summary (.tsv or .parquet).")
    g.add_argument("--chrom-key", default="chrom", metavar="COL", help="var column of gene chromosomes (chrom).")
    g.add_argument("--pos-key", default="start", metavar="COL", help="var column of gene positions, e.g. TSS (start).")
    g.add_argument("--variant-chrom-key", default="chrom", metavar="COL", help="Variant chromosome column (chrom).")
    g.add_argument("--variant-pos-key", default="pos", metavar="COL", help="Variant position column (pos).")
    g.add_argument(
        "--tensorqtl",
        metavar="PREFIX",
        help=(
            "Also write the results as tensorQTL writes them: PREFIX.cis_qtl_pairs.CHROM.parquet per chromosome and "
            "PREFIX.cis_qtl.txt.gz, and PREFIX.cis_independent_qtl.txt.gz with --independent-output (needs pyarrow)."
        ),
    )
    f = cis.add_argument_group("eGenes and independent signals")
    f.add_argument("--fdr", type=float, default=0.05, metavar="Q", help="FDR of the eGene calls (default 0.05).")
    f.add_argument(
        "--fdr-method",
        choices=("storey", "storey_bootstrap", "bh"),
        default="storey",
        help="q-values: Storey's (pi0 by smoother or bootstrap) or Benjamini-Hochberg (default storey).",
    )
    f.add_argument(
        "--gene-pval",
        choices=("acat", "bonf"),
        default="acat",
        help="Gene-level p-value the eGenes are called on: ACAT or the top variant's Bonferroni (default acat).",
    )
    f.add_argument(
        "--independent-output",
        metavar="SIGNALS.tsv",
        help="Find the independent signals of each eGene (forward-backward conditional selection) and write them.",
    )


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--donor-key", default=None, metavar="COL", help="obs column of donor IDs (default: donor_id).")
    g.add_argument(
        "--grm",
        "--grm-file",
        dest="grm",
        metavar="PATH",
        help=(
            "GRM file (.grm.bin, .grm.gz, .rel, .rel.bin, .mtx, square .tsv/.csv, or PLINK .bed genotypes) or a key "
            "of INPUT's uns (default: uns['grm'])."
        ),
    )
    g.add_argument(
        "--covariates",
        "--covariate-cols",
        dest="covariates",
        action="append",
        metavar="A,B",
        help="Covariate columns (comma-separated; numeric or categorical).",
    )
    g.add_argument(
        "--donor-covariates",
        "--donor-covariate-cols",
        dest="donor_covariates",
        action="append",
        metavar="A,B",
        help="Covariates constant within donor (checked; added to --covariates if missing there).",
    )
    g.add_argument("--layer", metavar="L", help="Layer holding expression (default: X).")
    g.add_argument("--genes", metavar="FILE_OR_LIST", help="Genes to fit: a file (one per line) or a comma list.")
    g.add_argument("--tau", type=float, metavar="X", help="Fix tau for every gene instead of estimating it.")
    g.add_argument(
        "--family",
        choices=("gaussian", "poisson", "negative_binomial"),
        default=None,
        help=(
            "gaussian (REML on e.g. log-normalised expression; the default), or poisson / negative_binomial "
            "(Laplace ML on raw counts, e.g. --layer counts)."
        ),
    )
    g.add_argument(
        "--offset", metavar="COL", help="obs column of a log-scale offset per cell (count families; e.g. log counts)."
    )
    g.add_argument("--key-added", default="nullfit", metavar="K", help="Key of the results (default: nullfit).")
    g.add_argument("--n-threads", type=int, metavar="N", help="Limit on BLAS threads (results do not depend on it).")
