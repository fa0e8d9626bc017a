"""Tests for jaxdl.finetune.partition: rule matching, coverage errors, split/merge, rows."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdl.core import tree as tree_lib
from jaxdl.finetune import partition


def _tree():
    """Hand-made tree: 3*4+4 backbone, 4*2+2 head, and a LoRA pair 4*1 + 1*2."""
    return {
        "params": {
            "backbone": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros((4,))},
            "head": {"kernel": jnp.full((4, 2), 2.0), "bias": jnp.zeros((2,), jnp.bfloat16)},
        },
        "lora": {"params": {"head": {"kernel": {"a": jnp.ones((4, 1)), "b": jnp.zeros((1, 2))}}}},
    }


RULES = [
    ("lora/.*", {"lr_mult": 10.0}),
    ("params/backbone/.*", {"trainable": False}),
    (".*/bias", {"wd_mult": 0.0}),
    (".*", {"lr_mult": 0.5, "unfreeze_at": 100}),
]


def test_first_match_wins_and_defaults():
    plan = partition.make_plan(_tree(), RULES)
    assert plan["params/backbone/bias"] == partition.LeafPlan(
        trainable=False, lr_mult=1.0, wd_mult=1.0, unfreeze_at=0, rule="params/backbone/.*"
    )
    assert plan["params/head/bias"] == partition.LeafPlan(True, 1.0, 0.0, 0, ".*/bias")
    assert plan["params/head/kernel"] == partition.LeafPlan(True, 0.5, 1.0, 100, ".*")
    assert plan["lora/params/head/kernel/a"].lr_mult == 10.0
    assert len(plan) == 6


def test_default_rules_with_and_without_lora():
    plan = partition.make_plan(_tree())
    trainable = sorted(p for p, lp in plan.items() if lp.trainable)
    assert trainable == ["lora/params/head/kernel/a", "lora/params/head/kernel/b"]
    no_lora = {"params": _tree()["params"]}
    assert all(lp.trainable for lp in partition.make_plan(no_lora).values())


def test_unmatched_leaves_are_listed():
    tree = {"params": {f"layer_{i:02d}": {"kernel": jnp.ones((1,))} for i in range(12)}}
    with pytest.raises(ValueError) as err:
        partition.make_plan(tree, [("params/layer_00/.*", {})])
    msg = str(err.value)
    assert "11 parameter(s) matched by no rule" in msg
    assert "params/layer_01/kernel" in msg and "params/layer_10/kernel" in msg
    assert "params/layer_11/kernel" not in msg and "and 1 more" in msg
    assert "('.*', {...})" in msg


def test_rule_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"'params/bakcbone/\.\*' matches no parameter"):
        partition.make_plan(_tree(), [("params/bakcbone/.*", {"trainable": False}), (".*", {})])


def test_shadowed_rule_is_an_error():
    with pytest.raises(ValueError, match=r"'params/head/\.\*' matches 2 .* earlier rules"):
        partition.make_plan(_tree(), [(".*", {}), ("params/head/.*", {"lr_mult": 2.0})])


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"trainabel": False}, "unknown field(s) ['trainabel']"),
        ({"lr_mult": -1.0}, "'lr_mult' must be a number >= 0"),
        ({"trainable": 1}, "'trainable' must be True or False"),
        ({"unfreeze_at": 1.5}, "'unfreeze_at' must be an int"),
        ({"trainable": False, "unfreeze_at": 5}, "needs 'trainable': True"),
        (None, "expected a dict of options"),
    ],
)
def test_bad_options_name_the_field(options, needle):
    with pytest.raises(ValueError) as err:
        partition.make_plan(_tree(), [(".*", options)])
    assert needle in str(err.value)


def test_bad_regex_and_bad_rule_shape():
    with pytest.raises(ValueError, match="not a valid regex"):
        partition.make_plan(_tree(), [("params/(", {})])
    with pytest.raises(ValueError, match=r"\(regex, options\) pair"):
        partition.make_plan(_tree(), [".*"])


def test_rules_as_lists_from_json_config():
    plan = partition.make_plan(_tree(), [["lora/.*", {}], [".*", {"trainable": False}]])
    assert sum(lp.trainable for lp in plan.values()) == 2


def test_split_merge_round_trip():
    tree = _tree()
    plan = partition.make_plan(tree, RULES)
    trainable, frozen = partition.split(tree, plan)
    assert sorted(tree_lib.flatten(frozen)) == ["params/backbone/bias", "params/backbone/kernel"]
    assert len(tree_lib.flatten(trainable)) == 4
    merged = tree_lib.merge(trainable, frozen)
    chex.assert_trees_all_equal(merged, tree)


def test_unfreeze_schedule_values_under_jit():
    tree = _tree()
    plan = partition.make_plan(tree, RULES)
    trainable, _ = partition.split(tree, plan)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def mults(step):
        return partition.lr_mult_tree(plan, trainable, step)

    expected = {  # step: (head/kernel, head/bias, lora a)
        0: (0.0, 1.0, 10.0),
        99: (0.0, 1.0, 10.0),
        100: (0.5, 1.0, 10.0),
        5000: (0.5, 1.0, 10.0),
    }
    for step, (kernel, bias, lora_a) in expected.items():
        m = mults(jnp.int32(step))
        assert m["params"]["head"]["kernel"].dtype == jnp.float32
        np.testing.assert_array_equal(m["params"]["head"]["kernel"], kernel)
        np.testing.assert_array_equal(m["params"]["head"]["bias"], bias)
        np.testing.assert_array_equal(m["lora"]["params"]["head"]["kernel"]["a"], lora_a)
    # Same structure as the trainable tree, so it multiplies updates leaf by leaf.
    scaled = jax.tree.map(lambda u, f: u * f, trainable, mults(jnp.int32(0)))
    np.testing.assert_array_equal(scaled["params"]["head"]["kernel"], 0.0)

    wd = partition.wd_mult_tree(plan, trainable)
    assert float(wd["params"]["head"]["bias"]) == 0.0
    assert float(wd["params"]["head"]["kernel"]) == 1.0


def test_plan_rows_counts_exact():
    tree = _tree()
    plan = partition.make_plan(tree, RULES)
    rows = partition.plan_rows(plan, tree, base_lr=1e-3, opt_state_slots=2)
    by_group = {row["group"]: row for row in rows}
    assert [r["group"] for r in rows] == ["params/backbone/.*", ".*", ".*/bias", "lora/.*"]
    assert by_group["params/backbone/.*"] == {
        "group": "params/backbone/.*",
        "leaves": 2,
        "params": 16,
        "trainable": False,
        "lr": 0.0,
        "lr_mult": 1.0,
        "wd_mult": 1.0,
        "unfreeze_at": 0,
        "param_bytes": 16 * 4,
        "quantized_leaves": 0,
        "opt_state_bytes": 0,
    }
    assert by_group[".*"]["params"] == 8
    assert by_group[".*"]["opt_state_bytes"] == 8 * 2 * 4
    assert by_group[".*"]["lr"] == pytest.approx(5e-4)
    # head/bias is bfloat16: 2 bytes per slot.
    assert by_group[".*/bias"]["opt_state_bytes"] == 2 * 2 * 2
    assert by_group["lora/.*"]["params"] == 6
    assert by_group["lora/.*"]["lr"] == pytest.approx(1e-2)
    assert sum(r["params"] for r in rows) == tree_lib.num_params(tree)

    table = partition.format_table(rows)
    lines = table.splitlines()
    assert lines[0].split() == [
        "group",
        "leaves",
        "params",
        "trainable",
        "lr",
        "wd_mult",
        "unfreeze_at",
        "bytes",
        "opt_bytes",
    ]
    # bytes: 16 + 8 float32, 2 bfloat16, 6 float32 (LoRA)
    assert lines[-1].split() == ["total", "6", "32", "124", "120"]
    assert len({len(line) for line in lines}) == 1


def test_plan_rows_state_a_quantized_kernel_by_its_stored_bytes():
    tree = _tree()
    plan = partition.make_plan(tree, RULES)
    stored = {"params/backbone/kernel": 12 + 4 * 4}  # int8 [3, 4] + a float32 scale [4]
    rows = partition.plan_rows(plan, tree, base_lr=1e-3, opt_state_slots=2, stored_bytes=stored)
    backbone = next(r for r in rows if r["group"] == "params/backbone/.*")
    assert (backbone["params"], backbone["param_bytes"]) == (16, 28 + 4 * 4)
    assert backbone["quantized_leaves"] == 1
