"""The documented baseline override: `'objective=[]'` removes an experiment's objectives (objective=null
is refused by Hydra for a config group on the command line)."""

import pytest

from tests.hydra_utils import compose_train


@pytest.mark.parametrize("experiment", ["lm_decorr", "avsr_decorr", "avsr_decorr_lrs3"])
def test_empty_objective_list_deselects_the_objective(experiment):
    assert "_target_" in compose_train([f"experiment={experiment}"]).objective.decorr
    objectives = compose_train([f"experiment={experiment}", "objective=[]"]).get("objective") or {}
    assert all("_target_" not in node for node in objectives.values())


def test_the_baseline_override_builds_no_objective():
    from harness.instantiate import instantiate_named

    for experiment in ("lm_decorr", "avsr_decorr", "avsr_decorr_lrs3"):
        cfg = compose_train([f"experiment={experiment}", "objective=[]"])
        assert instantiate_named(cfg.get("objective"), skip_unselected=True) == {}


def test_a_node_without_target_is_still_an_error_elsewhere():
    from omegaconf import OmegaConf

    from harness.instantiate import instantiate_named

    with pytest.raises(ValueError, match="has no _target_"):
        instantiate_named(OmegaConf.create({"csv": {"save_dir": "x"}}))
