"""Text classification, the article's 3.2 on a language model: which standard-library
package does a 128-byte snippet of source come from?

    python experiments/text_classify_stdlib.py --make-data runs/stdlib_snippets
    jaxdl train --config experiments/text_classify_stdlib.py --workdir runs/clf_scratch
    # pretrained: restore the byte GPT of experiments/lm_stdlib_pretrain.py, new last layer
    jaxdl train --config experiments/text_classify_stdlib.py --workdir runs/clf_pretrained \
        --config.init_from.checkpoint=runs/lm_pretrain \
        --config.init_from.reinit='["params/classifier/.*"]'
    # frozen but the head:   add --config.partition='[["params/classifier/.*", {}],
    #                              [".*", {"trainable": False}]]'
    # LoRA:                  add --config.lora='{"rank": 8, "alpha": 16,
    #                              "targets": ".*/(query|value)/kernel"}'
    #                          --config.partition='[["lora/.*", {}],
    #                              ["params/classifier/.*", {}], [".*", {"trainable": False}]]'

The packages (PACKAGES) lie beyond the first 4,000,000 bytes of the sorted standard
library that lm_stdlib_pretrain.py trains on, so the pretrained model never saw them.
Snippets are consecutive 128-byte pieces of their .py files (files are not kept
together: a split may hold other pieces of a file it also trains on).
"""

import ml_collections

PACKAGES = ("logging", "multiprocessing", "tkinter", "unittest", "xml")
SNIPPET_BYTES = 128
PER_CLASS = 300


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = {
        "name": "transformer",
        "size": "small",
        "vocab_size": 256,
        "head": "classify",
        "pooling": "mean",
        "num_classes": len(PACKAGES),
    }
    c.data = {"source": "textfolder:runs/stdlib_snippets", "seq_len": 128, "batch_size": 32}
    c.optimizer = {
        "name": "adamw",
        "learning_rate": 1e-3,
        "weight_decay": 0.01,
        "schedule": "warmup_cosine",
        "warmup_steps": 30,
        "grad_clip_norm": 1.0,
    }
    c.num_epochs = 4
    c.log_every = 20
    c.best_metric = "val_accuracy"
    return c


def make_data(out: str, per_class: int = PER_CLASS, seed: int = 0) -> None:
    """Write out/<package>/<n>.txt: `per_class` snippets per package, drawn with `seed`."""
    import sysconfig
    from pathlib import Path

    import numpy as np

    root = Path(sysconfig.get_paths()["stdlib"])
    rng = np.random.default_rng(seed)
    for package in PACKAGES:
        pieces = []
        for path in sorted((root / package).rglob("*.py")):
            if {"test", "tests", "idle_test"} & set(path.relative_to(root).parts):
                continue
            data = path.read_bytes().replace(b"\0", b"")
            pieces += [
                data[i : i + SNIPPET_BYTES]
                for i in range(0, len(data) - SNIPPET_BYTES, SNIPPET_BYTES)
                if data[i : i + SNIPPET_BYTES].strip()
            ]
        folder = Path(out) / package
        folder.mkdir(parents=True, exist_ok=True)
        for n, i in enumerate(sorted(rng.choice(len(pieces), per_class, replace=False))):
            (folder / f"{n:04d}.txt").write_bytes(pieces[i])
        print(f"{folder}: {per_class} of {len(pieces)} snippets")


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--make-data":
        make_data(sys.argv[2])
    else:
        sys.exit("usage: python experiments/text_classify_stdlib.py --make-data DIR")
