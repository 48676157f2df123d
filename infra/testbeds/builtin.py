"""The built-in tasks (`demo`, `planted`): one table of what each one brings.

Why: a config names a built-in task by `data.source` and the model paths (`teacher.path:
planted`); the stages that need task-specific parts (the prompt rows, the tokenizer, the
model build, the answer pattern, the lm-eval task) look them up here instead of testing for
one name each.

    demo      infra/testbeds/demo.py     three-digit addition; lm-eval task opdflow_arith
    planted   infra/testbeds/planted.py  the planted-rock testbed; lm-eval task opdflow_planted

Each module offers `make_examples(split, n, seed)`, `build_tokenizer()`, `ANSWER_PATTERN` and a
build function writing `teacher/` and `student/` model dirs; each task's spec is the config
section of the same name (`demo:`, `planted:`).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

EVAL_TEMPLATES = Path(__file__).resolve().parents[2] / "evals" / "tasks"


@dataclass(frozen=True)
class Builtin:
    name: str          # the config's data.source / teacher.path / student.path, and its spec section
    module: str        # the infra module
    build: str         # its build function: (spec, out_dir, progress) -> {"teacher": dir, "student": dir}
    eval_task: str     # its lm-eval task (a template under evals/tasks/)

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    def build_models(self, spec, out_dir: Path, progress=None) -> dict[str, Path]:
        return getattr(self.load(), self.build)(spec, out_dir, progress=progress)

    @property
    def template(self) -> Path:
        return EVAL_TEMPLATES / f"{self.eval_task}.yaml"

    @property
    def files(self) -> list[Path]:
        """The code the built models depend on (their cache key hashes it)."""
        here = Path(__file__).resolve().parent
        return [here / "demo.py"] + ([here / f"{self.name}.py"] if self.name != "demo" else [])


BUILTINS: dict[str, Builtin] = {
    "demo": Builtin("demo", "opdflow.infra.testbeds.demo", "build_demo", "opdflow_arith"),
    "planted": Builtin("planted", "opdflow.infra.testbeds.planted", "build_planted", "opdflow_planted"),
}


def builtin(name: str | None) -> Builtin | None:
    """The built-in task of that name, or None (a path, a dataset file...)."""
    return BUILTINS.get(name) if isinstance(name, str) else None


def answer_pattern(source: str) -> str | None:
    """The answer regex of a built-in data source (None for a user's dataset)."""
    b = builtin(source)
    return b.load().ANSWER_PATTERN if b else None
