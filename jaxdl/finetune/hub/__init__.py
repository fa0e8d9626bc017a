"""Import pretrained weights from other ecosystems into an ordinary jaxdl workdir.

`IMPORTERS` maps a KIND (``jaxdl import KIND --from PATH --out WORKDIR``) to a function
``(kind, path) -> workdir.Imported``; `import_checkpoint` resolves the source, runs the
importer and writes the workdir (`jaxdl.finetune.hub.workdir`).
"""
