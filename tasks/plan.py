"""The lifecycle as a list of stage names, and what each name means.

    models, prompts                                   inputs, resolved and recorded
    rollout.r01  score.r01  train.r01  ...            OPD rounds (the main run)
    rock-probe  rock-directions  rock                 rock-token analysis
    patch                                             inference-time patching at rock positions
    sensitivity                                       optional: the final student under every backend
    ablate-uniform.s1.rollout.r01 ...                 causal ablation: per training seed s (`ablation.seeds`)
    ablate-rock.s1.train.r01 ...                      and arm (uniform, rocks bypassed, random bypassed), the
    ablate-random.s1.rollout.r02 ...                  rounds from the initial student, same compute
    eval.teacher  eval.initial_student  ...           lm-eval per model
    eval.rock_bypass.s1.r01 ...                       lm-eval per arm, seed and round (learning curves)
    report                                            evaluation table + ablation verdict

This module is the one place that knows the names: `StageName` / `parse` / `str()`
round-trip, and `plan` lists a run's stages in order. `REGISTRY` is the one list of stage
kinds: each line names a kind's name pattern and the module that declares it (a
`tasks/stage.Stage`: what it needs, its plain function, shards, report, Prefect tasks);
`parse`, the plan, the flow's tasks and the tests all derive from it. The plan is every
declared stage's `instances`, ordered so that each stage comes after what it `needs`.

An ablation seed's arms share everything but the loss weights: the same prompts per
round, the same sampling seeds (`seed_tag`), the same batch order. Round 1 starts every
arm from the initial student with those seeds, so its rollouts are identical across the
arms: the plan samples and scores them once, in the uniform arm
(`ablate-uniform.sN.rollout.r01`), and the bypass arms' first round trains on them
(`rollout_of`). Later rounds sample from each arm's own checkpoint.
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from opdflow.infra.config import BUILTINS, Config

if TYPE_CHECKING:
    from opdflow.tasks.stage import Stage

ARMS = {"uniform": "ablate-uniform", "rock": "ablate-rock", "random": "ablate-random"}
LABEL_OF_ARM = {"ablate-uniform": "uniform", "ablate-rock": "rock_bypass", "ablate-random": "random_bypass"}
ARM_OF_LABEL = {v: k for k, v in LABEL_OF_ARM.items()}
UNIFORM = ARMS["uniform"]

# The stage registry: kind -> (name pattern, the module under opdflow.tasks whose `STAGES`
# declares it). Patterns: "single" (`rock`), "round" (`[ablate-<arm>.s<seed>.]<kind>.rNN`),
# "eval" (`eval.<model label>`). Adding a stage: its module and one line here, in the order
# its stages should be listed among stages that do not depend on each other.
REGISTRY: dict[str, tuple[str, str]] = {
    "models": ("single", "models"),
    "prompts": ("single", "prompts"),
    "rollout": ("round", "rollout"),
    "score": ("round", "score"),
    "train": ("round", "train"),
    "rock-probe": ("single", "rock.probe"),
    "rock-directions": ("single", "rock.probe"),
    "rock": ("single", "rock.analysis"),
    "patch": ("single", "patch"),
    "eval": ("eval", "evaluate"),
    "sensitivity": ("single", "sensitivity"),
    "report": ("single", "report"),
}
SINGLE = tuple(k for k, (pattern, _) in REGISTRY.items() if pattern == "single")
ROUND_KINDS = tuple(k for k, (pattern, _) in REGISTRY.items() if pattern == "round")


@functools.cache
def stages() -> dict[str, "Stage"]:
    """kind -> its `Stage` declaration, imported from the registry's modules on first use
    (they import this module, so not at import time)."""
    out = {}
    for kind, (_, module) in REGISTRY.items():
        declared = {s.kind: s for s in importlib.import_module(f"opdflow.tasks.{module}").STAGES}
        if kind not in declared:
            raise TypeError(f"opdflow.tasks.{module}.STAGES declares no stage of kind {kind!r}")
        out[kind] = declared[kind]
    return out


def stage_of(name: str) -> "Stage":
    """The declaration of a stage name's kind (`rollout.r01` -> rollout's); ValueError for a
    name that is no stage's."""
    kind = parse(name).kind
    return stages()[kind]


@dataclass(frozen=True)
class StageName:
    arm: str    # "main" or an ablation arm prefix (ablate-uniform, ablate-rock, ablate-random)
    kind: str   # models, prompts, rollout, score, train, rock-probe, rock-directions, rock, patch, eval, report
    round: int = 0
    label: str = ""  # eval's model label (an arm's eval: "rock_bypass.s1.r01")
    seed: int | None = None  # the ablation seed of an arm's stage

    def __str__(self) -> str:
        if self.kind == "eval":
            return f"eval.{self.label}"
        if self.round:
            head = "" if self.arm == "main" else f"{self.arm}.s{self.seed}."
            return f"{head}{self.kind}.r{self.round:02d}"
        return self.kind


def round_stage(kind: str, r: int, arm: str = "main", seed: int | None = None) -> str:
    """The name of a per-round stage; `parse` reads it back.

    >>> round_stage("train", 1), round_stage("rollout", 2, ARMS["rock"], seed=1)
    ('train.r01', 'ablate-rock.s1.rollout.r02')
    """
    return str(StageName(arm, kind, r, seed=seed))


def arm_label(arm: str, seed: int, r: int) -> str:
    """The model label of an arm's checkpoint after round r of seed `seed`: `rock_bypass.s1.r01`."""
    return f"{LABEL_OF_ARM[arm]}.s{seed}.r{r:02d}"


def _seed_part(p: str) -> int | None:
    return int(p[1:]) if p[:1] == "s" and p[1:].isdigit() else None


def _round_part(p: str) -> int | None:
    return int(p[1:]) if p[:1] == "r" and p[1:].isdigit() and int(p[1:]) > 0 else None


def parse(stage: str) -> StageName:
    """What a stage name says: arm, kind, round, eval label, ablation seed.

    >>> parse("train.r03")
    StageName(arm='main', kind='train', round=3, label='', seed=None)
    >>> parse("eval.rock_bypass.s1.r01")
    StageName(arm='ablate-rock', kind='eval', round=1, label='rock_bypass.s1.r01', seed=1)
    >>> str(parse("ablate-rock.s1.train.r02"))
    'ablate-rock.s1.train.r02'
    >>> parse("train.r00")
    Traceback (most recent call last):
    ...
    ValueError: unknown stage name 'train.r00'; see `opdflow status --run-id ID` for this run's stages
    """
    parts = stage.split(".")
    if parts[0] == "eval" and len(parts) == 2 and parts[1]:
        return StageName("main", "eval", label=parts[1])
    if parts[0] == "eval" and len(parts) == 4 and parts[1] in ARM_OF_LABEL:
        seed, r = _seed_part(parts[2]), _round_part(parts[3])
        if seed is not None and r is not None:
            return StageName(ARM_OF_LABEL[parts[1]], "eval", r, label=".".join(parts[1:]), seed=seed)
    if len(parts) == 1 and parts[0] in SINGLE:
        return StageName("main", parts[0])
    arm, seed = "main", None
    if parts[0] in LABEL_OF_ARM and len(parts) == 4:
        arm, seed, parts = parts[0], _seed_part(parts[1]), parts[2:]
        if seed is None:
            parts = []
    if len(parts) == 2 and parts[0] in ROUND_KINDS and _round_part(parts[1]) is not None:
        return StageName(arm, parts[0], _round_part(parts[1]), seed=seed)
    raise ValueError(f"unknown stage name {stage!r}; see `opdflow status --run-id ID` for this run's stages")


def arm_rounds(config: Config, arm: str) -> int:
    return config.train.rounds if arm == "main" else config.ablation.rounds


def ablation_arms(config: Config) -> list[str]:
    """The arms of each ablation seed: uniform first (the baseline), then the bypass arms."""
    if not config.ablation.enabled:
        return []
    return [UNIFORM] + [ARMS[a] for a in config.ablation.arms if ARMS[a] != UNIFORM]


def seed_tag(name: StageName) -> tuple:
    """What an arm's seed adds in front of every seed derivation (prompt order, sampling
    seeds, batch order, torch's seed): () for the main run, ("ablation-seed", s) for seed s.
    Not the arm: a seed's arms share their randomness (paired)."""
    return () if name.seed is None else ("ablation-seed", name.seed)


def rollout_of(name: StageName) -> tuple[str, str]:
    """(rollout stage, score stage) a train stage trains on: its own round's, except an
    ablation arm's round 1, which is the same for every arm of the seed (same start, same
    seeds) and so sampled once, in the uniform arm."""
    arm = UNIFORM if name.arm != "main" and name.round == 1 else name.arm
    return round_stage("rollout", name.round, arm, name.seed), round_stage("score", name.round, arm, name.seed)


def patching_enabled(config: Config) -> bool:
    """The `patch` stage runs with the ablation when it can score answers (demo data, or a regex)."""
    a = config.ablation
    return a.enabled and a.patching and (config.data.source in BUILTINS or a.patch_answer_regex is not None)


def arm_eval_labels(config: Config) -> list[str]:
    """Every arm x seed x round checkpoint's eval label, in plan order."""
    return [arm_label(arm, s, r) for s in config.ablation.seeds for arm in ablation_arms(config)
            for r in range(1, config.ablation.rounds + 1)]


def eval_labels(config: Config) -> list[str]:
    return ["teacher", "initial_student", "final_student"] + (arm_eval_labels(config) if config.ablation.enabled else [])


def checkpoint_of(config: Config, label: str) -> tuple[str, str]:
    """(stage, output prefix) of the model dir a label names."""
    if label == "teacher":
        return "models", "teacher"
    if label == "initial_student":
        return "models", "student"
    if label == "final_student":
        return round_stage("train", config.train.rounds), "model"
    try:
        name = parse(f"eval.{label}")
    except ValueError:
        name = None
    if name is not None and name.seed is not None:
        return round_stage("train", name.round, name.arm, name.seed), "model"
    raise ValueError(f"unknown model label {label!r}")


def student_before(config: Config, arm: str, r: int, seed: int | None = None) -> tuple[str, str]:
    """The student checkpoint a round starts from: the previous round's, or the initial one."""
    return ("models", "student") if r == 1 else (round_stage("train", r - 1, arm, seed), "model")


def arm_round_stages(config: Config, kind: str) -> list[str]:
    """Every ablation seed x arm x round stage of a round kind; an arm's round-1 rollout and
    score exist once per seed, in the uniform arm (`rollout_of`)."""
    if not config.ablation.enabled:
        return []
    out = []
    for s in config.ablation.seeds:
        for arm in ablation_arms(config):
            for r in range(1, config.ablation.rounds + 1):
                name = round_stage(kind, r, arm, s)
                if kind == "train" or name in rollout_of(StageName(arm, "train", r, seed=s)):
                    out.append(name)
    return out


def round_instances(kind: str):
    """`instances` of a round kind: the main run's rounds, then every arm x seed x round."""
    return lambda config: [round_stage(kind, r) for r in range(1, config.train.rounds + 1)] + \
        arm_round_stages(config, kind)


def _listing_key(name: StageName, rank: int, index: int) -> tuple:
    """Where a stage is listed among those it does not depend on: inputs, the main run's
    rounds, each ablation seed x arm's rounds (with their evals), then the rest, each group
    in registry order (`rank`) and a kind's own order (`index`)."""
    if name.seed is not None:
        return (2, name.seed, list(ARMS.values()).index(name.arm), name.round, rank)
    if name.round:
        return (1, name.round, rank)
    return (0 if rank < list(REGISTRY).index("rollout") else 3, rank, index)


def instances(config: Config) -> list[str]:
    """Every stage name of a run, kind by kind in registry order (not yet ordered by needs)."""
    return [name for st in stages().values() for name in st.instances(config)]


def needs(config: Config, name: str) -> list[str]:
    """The stages whose outputs `name` reads (its declaration's `needs`), each once."""
    return list(dict.fromkeys(stage_of(name).needs(config, name)))


def plan(config: Config) -> list[str]:
    """A run's stages in order: every stage after the stages it needs (depth first, each
    stage listed by `_listing_key`)."""
    ranks = {kind: i for i, kind in enumerate(REGISTRY)}
    listed = []
    for st in stages().values():
        listed += [(_listing_key(parse(n), ranks[st.kind], i), n) for i, n in enumerate(st.instances(config))]
    names = {n for _, n in listed}
    out: list[str] = []
    seen: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name in path:
            raise ValueError(f"stages depend on each other in a circle: {' -> '.join(path + (name,))}")
        for dep in needs(config, name):
            if dep not in names:
                raise ValueError(f"stage {name} needs {dep}, which this run does not have")
            visit(dep, path + (name,))
        seen.add(name)
        out.append(name)
    for _, name in sorted(listed):
        visit(name, ())
    return out
