"""Stage names: the one place that knows them (tasks/plan.py) round-trips, and the plan has
every arm x seed x round of the ablation, each evaluated."""
from __future__ import annotations

import pytest

from opdflow.infra.config import ConfigError, parse_config
from opdflow.tasks.plan import (StageName, checkpoint_of, eval_labels, parse, plan, rollout_of, seed_tag,
                                student_before)


def _config(**ablation):
    return parse_config({"train": {"rounds": 2}, "ablation": {"rounds": 2, "seeds": [1, 7], **ablation}})


def test_every_planned_name_round_trips():
    c = _config()
    stages = plan(c)
    assert len(stages) == len(set(stages))
    for st in stages:
        assert str(parse(st)) == st, st
    name = parse("ablate-uniform.s7.rollout.r02")
    assert (name.arm, name.kind, name.round, name.seed) == ("ablate-uniform", "rollout", 2, 7)
    ev = parse("eval.rock_bypass.s1.r02")
    assert (ev.arm, ev.kind, ev.round, ev.seed, ev.label) == ("ablate-rock", "eval", 2, 1, "rock_bypass.s1.r02")
    for bad in ("ablate-rock.rollout.r01", "ablate-rock.sx.train.r01", "eval.rock_bypass.s1", "train.r00",
                "eval.nope.s1.r01", "ablate-rock.s1.eval.r01"):
        with pytest.raises(ValueError, match="unknown stage name"):
            parse(bad)


def test_plan_has_every_arm_seed_round_and_its_eval():
    c = _config()
    stages = plan(c)
    for s in (1, 7):
        for arm, label in (("ablate-uniform", "uniform"), ("ablate-rock", "rock_bypass"),
                           ("ablate-random", "random_bypass")):
            for r in (1, 2):
                train = f"{arm}.s{s}.train.r{r:02d}"
                assert train in stages and f"eval.{label}.s{s}.r{r:02d}" in stages
                assert stages.index(train) < stages.index(f"eval.{label}.s{s}.r{r:02d}")
                ro, sc = rollout_of(parse(train))
                assert ro in stages and sc in stages and stages.index(sc) < stages.index(train)
        # round 1 is sampled once per seed, in the uniform arm; later rounds per arm
        assert rollout_of(parse(f"ablate-rock.s{s}.train.r01"))[0] == f"ablate-uniform.s{s}.rollout.r01"
        assert f"ablate-rock.s{s}.rollout.r01" not in stages and f"ablate-rock.s{s}.rollout.r02" in stages
    assert len([x for x in eval_labels(c) if "." in x]) == 2 * 3 * 2
    assert "ablate-rock.s1.train.r01" not in plan(_config(arms=["random"]))
    assert not any(x.startswith("ablate") for x in plan(_config(enabled=False)))


def test_seed_tags_and_checkpoints():
    assert seed_tag(StageName("main", "rollout", 1)) == ()
    assert seed_tag(parse("ablate-rock.s3.train.r02")) == seed_tag(parse("ablate-uniform.s3.rollout.r01")) == \
        ("ablation-seed", 3)
    c = _config()
    assert checkpoint_of(c, "random_bypass.s7.r02") == ("ablate-random.s7.train.r02", "model")
    assert student_before(c, "ablate-rock", 2, 7) == ("ablate-rock.s7.train.r01", "model")
    assert student_before(c, "ablate-rock", 1, 7) == ("models", "student")
    with pytest.raises(ValueError, match="unknown model label"):
        checkpoint_of(c, "rock_bypass")


def test_ablation_config_fields():
    a = parse_config({}).ablation
    assert a.seeds == [1, 2, 3] and a.margin == 0.05 and a.position == "target"
    with pytest.raises(ConfigError, match="ablation.seeds"):
        parse_config({"ablation": {"seeds": [1, 1]}})
    with pytest.raises(ConfigError, match="ablation.position"):
        parse_config({"ablation": {"position": "output"}})


def test_registry_declares_every_kind_and_the_plan_respects_needs():
    """One registry (kind -> pattern, module): each module declares its kinds; parse knows
    exactly the registry's kinds; every planned stage comes after every stage it needs, and
    a stage only needs stages of the plan."""
    from opdflow.tasks.plan import REGISTRY, needs, stages
    decl = stages()
    assert list(decl) == list(REGISTRY)
    for kind, st in decl.items():
        assert st.kind == kind and st.module == f"opdflow.tasks.{REGISTRY[kind][1]}"
        assert st.task.name == kind and (st.shard_task.name == f"{kind}-shard" if st.sharded else True)
    for c in (_config(), _config(enabled=False), parse_config({"sensitivity": {"enabled": True}})):
        stages_ = plan(c)
        assert {parse(s).kind for s in stages_} <= set(REGISTRY)
        pos = {s: i for i, s in enumerate(stages_)}
        for s in stages_:
            for dep in needs(c, s):
                assert dep in pos and pos[dep] < pos[s], (s, dep)
    assert "sensitivity" in plan(parse_config({"sensitivity": {"enabled": True}}))
    assert "sensitivity" not in plan(_config())
    # the main run's round 2 waits on its round 1; an arm's round 1 on the rock sets, not on the main rounds' scores
    c = _config()
    assert needs(c, "train.r02") == ["rollout.r02", "score.r02", "train.r01"]
    assert needs(c, "ablate-rock.s1.train.r01") == ["ablate-uniform.s1.rollout.r01", "ablate-uniform.s1.score.r01",
                                                    "models", "rock"]
    assert needs(c, "eval.teacher") == ["prompts", "models"]


def test_stage_code_versions_cover_what_each_stage_imports():
    """A stage's code version hashes its module's import closure (`infra/artifacts/provenance`): train's
    holds the training loop, the kernels and the stages it reads, not the report, the rock
    analysis (plots) or the verdict; the report's holds the verdict."""
    from opdflow.infra.artifacts.manifest import stage_code_version
    from opdflow.infra.artifacts.provenance import code_version, module_closure
    train = set(module_closure("opdflow.tasks.train"))
    assert {"opdflow.tasks.train_worker", "opdflow.kernels.loss", "opdflow.tasks.score", "opdflow.tasks.control",
            "opdflow.infra.artifacts.manifest"} <= train
    assert not train & {"opdflow.tasks.report", "opdflow.tasks.rock.analysis", "opdflow.tasks.rock.report",
                        "opdflow.tasks.verdict", "opdflow.tasks.summary", "opdflow.tasks.patch", "opdflow.tasks.evaluate",
                        "opdflow.flows.lifecycle"}
    # the rock report (plots, markdown) is in the closure of `rock` only, not of the probe stages
    assert "opdflow.tasks.rock.report" in module_closure("opdflow.tasks.rock.analysis")
    assert "opdflow.tasks.rock.report" not in module_closure("opdflow.tasks.rock.probe")
    assert "opdflow.tasks.verdict" in module_closure("opdflow.tasks.report")
    assert stage_code_version("train.r01") == stage_code_version("ablate-rock.s1.train.r02") \
        == stage_code_version("train.r01.shard-000-of-001")
    assert stage_code_version("rock-probe") == stage_code_version("rock-directions") != stage_code_version("rock")
    assert stage_code_version("not-a-stage") == code_version()
