"""Sphinx configuration for scverse-nullfit."""

import socket
from datetime import date
from importlib.metadata import version as _version

project = "scverse-nullfit"
author = "scverse-nullfit developers"
copyright = f"{date.today():%Y}, {author}"
release = version = _version("scverse-nullfit")

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx_autodoc_typehints",
    "sphinx_copybutton",
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
master_doc = "index"

autosummary_generate = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
napoleon_use_param = True
typehints_defaults = "comma"
always_document_param_types = False

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# The tutorial is executed on every docs build, so it cannot rot; an error in a cell fails the build.
nb_execution_mode = "force"
nb_execution_timeout = 300
nb_execution_raise_on_error = True
nb_merge_streams = True


def _online(host: str = "docs.python.org", port: int = 443, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# Cross-links to the scverse/numpy docs need their inventories; on machines without internet access
# (such as CI here) the build goes on without them rather than failing on unreachable hosts.
intersphinx_mapping = (
    {
        "python": ("https://docs.python.org/3", None),
        "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
        "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
        "numpy": ("https://numpy.org/doc/stable/", None),
        "pandas": ("https://pandas.pydata.org/docs/", None),
        "scipy": ("https://docs.scipy.org/doc/scipy/", None),
    }
    if _online()
    else {}
)
nitpicky = False

html_theme = "sphinx_book_theme"
html_title = "scverse-nullfit"
html_static_path = ["_static"]
html_theme_options = {
    "repository_url": "https://github.com/scverse/scverse-nullfit",
    "use_repository_button": False,
    "show_toc_level": 2,
}
