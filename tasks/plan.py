"""The lifecycle as a list of stage names, and what each name means.

    models, prompts                                   inputs, resolved and recorded
    rollout.r01  score.r01  train.r01  ...            OPD rounds (the main, uniform arm)
    rock-probe  rock-directions  rock                 rock-token analysis
    patch                                             inference-time patching at rock positions
    ablate-rock.rollout.r01 ... ablate-rock.train.rNN  causal ablation arms, from the
    ablate-random.rollout.r01 ...                      initial student, same compute
    eval.teacher  eval.initial_student  ...           lm-eval per model
    report                                            evaluation table + ablation verdict

The ablation's uniform arm is the main run's own first `ablation.rounds` rounds: same
start, same prompts, same seeds, same steps; only the loss weights differ.
"""
from __future__ import annotations

from dataclasses import dataclass

from opdflow.infra.config import Config

ARMS = {"rock": "ablate-rock", "random": "ablate-random"}
LABEL_OF_ARM = {"ablate-rock": "rock_bypass", "ablate-random": "random_bypass"}


@dataclass(frozen=True)
class StageName:
    arm: str    # "main" or an ablation arm prefix
    kind: str   # models, prompts, rollout, score, train, rock-probe, rock-directions, rock, eval, report
    round: int = 0
    label: str = ""  # eval's model label

    def __str__(self) -> str:
        if self.kind == "eval":
            return f"eval.{self.label}"
        if self.round:
            head = "" if self.arm == "main" else f"{self.arm}."
            return f"{head}{self.kind}.r{self.round:02d}"
        return self.kind


def round_stage(kind: str, r: int, arm: str = "main") -> str:
    return str(StageName(arm, kind, r))


def parse(stage: str) -> StageName:
    parts = stage.split(".")
    if parts[0] == "eval" and len(parts) == 2:
        return StageName("main", "eval", label=parts[1])
    if len(parts) == 1 and parts[0] in ("models", "prompts", "rock-probe", "rock-directions", "rock", "patch", "report"):
        return StageName("main", parts[0])
    arm = "main"
    if parts[0] in LABEL_OF_ARM:
        arm, parts = parts[0], parts[1:]
    if len(parts) == 2 and parts[0] in ("rollout", "score", "train") and parts[1][:1] == "r" and parts[1][1:].isdigit():
        return StageName(arm, parts[0], int(parts[1][1:]))
    raise ValueError(f"unknown stage name {stage!r}; see `opdflow status --run-id ID` for this run's stages")


def arm_rounds(config: Config, arm: str) -> int:
    return config.train.rounds if arm == "main" else config.ablation.rounds


def ablation_arms(config: Config) -> list[str]:
    return [ARMS[a] for a in config.ablation.arms] if config.ablation.enabled else []


def patching_enabled(config: Config) -> bool:
    """The `patch` stage runs with the ablation when it can score answers (demo data, or a regex)."""
    a = config.ablation
    return a.enabled and a.patching and (config.data.source == "demo" or a.patch_answer_regex is not None)


def eval_labels(config: Config) -> list[str]:
    labels = ["teacher", "initial_student", "final_student"]
    if config.ablation.enabled:
        if config.ablation.rounds < config.train.rounds:
            labels.append(f"uniform_r{config.ablation.rounds:02d}")
        labels += [LABEL_OF_ARM[a] for a in ablation_arms(config)]
    return labels


def checkpoint_of(config: Config, label: str) -> tuple[str, str]:
    """(stage, output prefix) of the model dir a label names."""
    if label == "teacher":
        return "models", "teacher"
    if label == "initial_student":
        return "models", "student"
    if label == "final_student":
        return round_stage("train", config.train.rounds), "model"
    if label.startswith("uniform_r"):
        return round_stage("train", int(label[len("uniform_r"):])), "model"
    for arm, lab in LABEL_OF_ARM.items():
        if label == lab:
            return round_stage("train", config.ablation.rounds, arm), "model"
    raise ValueError(f"unknown model label {label!r}")


def student_before(config: Config, arm: str, r: int) -> tuple[str, str]:
    """The student checkpoint a round starts from: the previous round's, or the initial one."""
    return ("models", "student") if r == 1 else (round_stage("train", r - 1, arm), "model")


def plan(config: Config) -> list[str]:
    stages = ["models", "prompts"]
    for r in range(1, config.train.rounds + 1):
        stages += [round_stage(k, r) for k in ("rollout", "score", "train")]
    stages += ["rock-probe", "rock-directions", "rock"] + (["patch"] if patching_enabled(config) else [])
    for arm in ablation_arms(config):
        for r in range(1, config.ablation.rounds + 1):
            stages += [round_stage(k, r, arm) for k in ("rollout", "score", "train")]
    stages += [f"eval.{label}" for label in eval_labels(config)]
    stages.append("report")
    return stages
