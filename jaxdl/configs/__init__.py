"""Configs shipped in the wheel: `jaxdl train --config NAME` finds `jaxdl/configs/NAME.py`.

These are the configs `jaxdl demo` runs, the article's two classifiers and `tabular` (any
CSV, the base of the table experiments); research configs live in the repository's
experiments/ folder.
"""
