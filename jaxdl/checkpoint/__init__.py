"""Orbax checkpoints: the run's manager (save, resume, best) and readers (load_*).

Submodules are imported on use: `jaxdl.checkpoint.load` for `load_model`,
`jaxdl.checkpoint.manager` for `Checkpointer`, `jaxdl.checkpoint.read` for the rest.
"""
