"""Docstring snippets shared between functions, and :func:`doc_params` to put them in (a leaf module)."""

from __future__ import annotations

import inspect


def doc_params(**snippets: str):
    """Replace ``{name}`` in the decorated object's (cleaned) docstring by ``snippets[name]``.

    Snippets are written flush left, their descriptions indented by four spaces, like the cleaned docstring.
    Only the given names are replaced, so other braces in a docstring stay as they are.
    """

    def decorate(obj):
        doc = inspect.cleandoc(obj.__doc__)
        for name, text in snippets.items():
            doc = doc.replace("{" + name + "}", text)
        obj.__doc__ = doc
        return obj

    return decorate


def _stored_by(tool: str) -> str:
    return f"""\
adata
    An AnnData on which :func:`~scverse_nullfit.tl.{tool}` has been run (possibly read back from h5ad).
key
    The ``key_added`` of that call."""


#: ``adata`` and ``key`` of a function reading what ``fit_null`` stored.
doc_null_result = _stored_by("fit_null")
#: ``adata`` and ``key`` of a function reading what ``cis_map`` stored.
doc_cis_result = _stored_by("cis_map")

doc_n_threads = """\
n_threads
    Threads for the call: it limits BLAS and sizes the package's own thread pools (the compiled pass over the
    expression, the gene chunks) alike. Default: scanpy's ``settings.n_jobs`` when it has been set (``-1`` for every
    CPU), else every CPU the process may use."""

doc_spa = """\
spa
    For count fits (``family="poisson"`` or ``"negative_binomial"``): where ``|z| > 2``, ``pval`` is the saddlepoint
    approximation of the score's distribution (as SAIGE-QTL's SPA; see "Saddlepoint p-values" on the "Model and
    algorithm" page), better calibrated than the normal p-value for low counts and rare variants; ``score``,
    ``score_var``, ``z``, ``beta`` and ``se`` are unchanged. ``False``: normal p-values throughout. No effect on
    Gaussian fits."""

doc_copy = """\
copy
    Return a copy instead of writing into ``adata``."""

doc_step2_genes = """\
genes
    Names or a boolean mask of the genes to test (default: all genes)."""

doc_ax_show = """\
ax
    Axes to draw into (default: a new figure).
show
    Show the figure (default: scanpy's ``settings.autoshow``)."""

doc_plot_returns = """\
Returns
-------
The Axes when ``show=False``, else None."""

#: The per-variant columns of the step-2 tables (a phrase, for a Returns section).
doc_variant_columns = """\
``ref`` and ``alt`` (the alleles as the genotype source names them: ``ref``/``alt`` columns of its ``var``,
cellink's ``a0``/``a1``, or a PLINK ``.bim``'s allele 2 / allele 1; categoricals, NaN for a DataFrame of dosages;
``alt`` is the counted allele, so ``beta`` is the effect of one more copy of it), ``af`` (the frequency of ``alt``
among the fit's donors with an observed dosage, ``mean dosage / 2``; mean imputation of missing dosages leaves it
unchanged), ``ma_samples`` (those donors carrying the minor allele), ``ma_count`` (their minor alleles, rounded),
``n_donors`` (the fit's donors with an observed dosage) and ``n_cells`` (their cells)"""
