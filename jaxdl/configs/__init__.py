"""Configs shipped in the wheel: `jaxdl train --config NAME` finds `jaxdl/configs/NAME.py`.

These are the configs `jaxdl demo` runs and the article's two classifiers; research configs
live in the repository's experiments/ folder.
"""
