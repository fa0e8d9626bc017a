"""grain worker processes give the in-process batches, and resume exactly."""

import numpy as np

from jaxdl.data import build_data, prefetch_to_device


def test_workers_match_in_process_and_resume(tmp_path):
    cfg = {
        "source": "digits",
        "data_dir": str(tmp_path),
        "train_transforms": ["random_rotation(15)", "random_flip"],
    }
    data = build_data(cfg, seed=0)
    steps = data.steps_per_epoch(64, shard=(0, 1))  # 19: read across the epoch boundary
    in_process = data.train_iter(64, seed=4, shard=(0, 1))
    reference = [next(in_process) for _ in range(steps + 3)]
    workers = prefetch_to_device(data.train_iter(64, seed=4, num_workers=2, shard=(0, 1)))
    got = [next(workers) for _ in range(steps - 1)]
    state = workers.get_state()
    workers.close()
    resumed = data.train_iter(64, seed=4, num_workers=2, shard=(0, 1))
    resumed.set_state(state)
    got += [next(resumed) for _ in range(4)]
    resumed.close()
    assert state["step"] == steps - 1 and len(got) == len(reference)
    for a, b in zip(got, reference, strict=True):
        np.testing.assert_array_equal(np.asarray(a["image"]), b["image"])
        np.testing.assert_array_equal(np.asarray(a["label"]), b["label"])


def test_starting_workers_leaves_absl_flags_as_they_were():
    from absl import flags

    from jaxdl.data import build_data

    flags.FLAGS.unparse_flags()  # as in any program that is not an absl app
    data = build_data({"source": "digits"}, seed=0, num_classes=10)
    workers = data.train_iter(32, seed=0, num_workers=1)
    next(workers)
    workers.close()
    assert not flags.FLAGS.is_parsed()
