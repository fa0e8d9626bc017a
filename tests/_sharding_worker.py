"""The 8-device half of tests/parallel/test_sharding.py (and the configs both halves train).

Usage: python tests/_sharding_worker.py OUT REF. Runs on 8 simulated CPU devices (the flag
must be set before jax is imported, hence a separate process). Trains every run of `RUNS`
into OUT/<name>, then restores across topologies: OUT/mlp_fsdp (saved on 8 devices) onto
4 devices, and REF/mlp (saved by the 1-device parent) onto 8, both as a resume
(Checkpointer.restore into a template on the new mesh) and as a fine-tuning start
(init_from.checkpoint). Writes what it saw to OUT/facts.json.
"""

import json
import os
import sys

STEPS = ["--config.num_epochs=0", "--config.num_steps=20", "--config.log_every=1"]
MODELS = {
    "mlp": ("experiments/digits_mlp.py", [*STEPS, "--config.eval_every=20"]),
    "gpt": (
        "experiments/lm_stdlib_pretrain.py",
        [
            *STEPS,
            "--config.eval_every=20",
            "--config.model.size=tiny",
            "--config.data.source=text:pydoc",
            "--config.data.seq_len=32",
            "--config.data.max_bytes=40000",
            "--config.data.eval_batch_size=16",
            "--config.optimizer.warmup_steps=5",
        ],
    ),
}
# name -> (model, mesh): data parallel; FSDP (with tensor parallelism for the GPT).
RUNS = {
    "mlp_dp": ("mlp", {"data": 8}),
    "mlp_fsdp": ("mlp", {"fsdp": 8}),
    "gpt_dp": ("gpt", {"data": 8}),
    "gpt_fsdp_tp": ("gpt", {"fsdp": 4, "tensor": 2}),
}


def load(model: str, mesh: dict | None = None, extra=()):
    from jaxdl import config as config_lib

    path, overrides = MODELS[model]
    cfg = config_lib.load_config(path, [*overrides, *extra])
    if mesh is not None:
        cfg.mesh = mesh
    return cfg


def build_on(cfg, devices, mesh_cfg=None):
    """`build` for ``cfg`` with the state placed on a mesh over ``devices`` (FSDP default)."""
    from jaxdl.data import build_data
    from jaxdl.parallel import sharding
    from jaxdl.training.build import build

    mesh = sharding.make_mesh(mesh_cfg or {"fsdp": -1}, devices)
    data = build_data(cfg.data, seed=cfg.seed, num_classes=cfg.model.get("num_classes"))
    return build(
        cfg,
        kind=data.kind,
        example_spec=data.example_spec,
        num_classes=data.num_classes,
        total_steps=cfg.num_steps,
        mesh=mesh,
    )


def opt_leaf(tree, suffix: str):
    """The first leaf of ``tree`` whose path ends with ``suffix`` (in opt_state: Adam's mu)."""
    import jax

    from jaxdl.core.tree import path_str

    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return next(x for kp, x in leaves if path_str(kp).endswith(suffix))


def resume_on(workdir, cfg, devices, mesh_cfg=None, leaf="hidden_0/kernel") -> dict:
    """Restore the latest checkpoint of ``workdir`` onto ``devices``; what came back."""

    from jaxdl.checkpoint.manager import Checkpointer
    from jaxdl.training.runlog import params_sha256
    from jaxdl.training.trainer import full_params

    setup = build_on(cfg, devices, mesh_cfg)
    with Checkpointer(workdir) as ckpt:
        state, _ = ckpt.restore(setup.state)
    kernel = opt_leaf(state.params, leaf)
    mu = opt_leaf(state.opt_state, leaf)
    return {
        "sha": params_sha256(full_params(state, setup)),
        "step": int(state.step),
        "devices": len(kernel.sharding.device_set),
        "kernel_shard": list(kernel.sharding.shard_shape(kernel.shape)),
        "mu_shard": list(mu.sharding.shard_shape(mu.shape)),
    }


def finetune_on(workdir, cfg, devices) -> dict:
    """Start a run from ``workdir``'s weights (init_from) on ``devices``."""
    from jaxdl.training.runlog import params_sha256
    from jaxdl.training.trainer import full_params

    cfg = cfg.copy_and_resolve_references()
    cfg.init_from.checkpoint = str(workdir)
    setup = build_on(cfg, devices)
    kernel = opt_leaf(setup.state.params, "hidden_0/kernel")
    return {
        "sha": params_sha256(full_params(setup.state, setup)),
        "loaded": len(setup.init_report["loaded"]),
        "kernel_shard": list(kernel.sharding.shard_shape(kernel.shape)),
    }


def memory_rows(devices) -> list[dict]:
    """benchmarks/memory_report.py's rows for the tiny GPT (data parallel, FSDP)."""
    sys.path.insert(0, os.getcwd())
    from benchmarks import memory_report

    args = memory_report._args(["--models", "tiny", "--seq-len", "32"])
    return [memory_report.measure("tiny", s, devices, args) for s in memory_report.STRATEGIES]


def main(out: str, ref: str) -> None:
    import jax

    from jaxdl.training.trainer import train

    assert jax.device_count() == 8, jax.devices()
    facts = {"runs": {}}
    for name, (model, mesh) in RUNS.items():
        summary = train(
            load(model, mesh), os.path.join(out, name), progress=False, echo=lambda *a: None
        )
        facts["runs"][name] = summary
    cfg = load("mlp")
    devices = jax.devices()
    facts["resume_8_to_4"] = resume_on(os.path.join(out, "mlp_fsdp"), cfg, devices[:4])
    facts["resume_1_to_8"] = resume_on(os.path.join(ref, "mlp"), cfg, devices)
    facts["finetune_8_to_4"] = finetune_on(os.path.join(out, "mlp_fsdp"), cfg, devices[:4])
    facts["finetune_1_to_8"] = finetune_on(os.path.join(ref, "mlp"), cfg, devices)
    _, mesh = RUNS["gpt_fsdp_tp"]
    gpt = os.path.join(out, "gpt_fsdp_tp")
    facts["gpt_fsdp_tp"] = {
        leaf: resume_on(gpt, load("gpt"), devices, mesh, leaf)
        for leaf in ("attn/query/kernel", "mlp/fc2/kernel")
    }
    facts["memory"] = memory_rows(devices)
    with open(os.path.join(out, "facts.json"), "w") as f:
        json.dump(facts, f, indent=1)


if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main(*sys.argv[1:3])
