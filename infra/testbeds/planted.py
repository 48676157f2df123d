"""The planted-rock testbed: a built-in task where the rock tokens are known by construction.

Why: on the arithmetic demo the highest-KL tokens are the digits that carry the answer, so it
cannot tell whether the rock analysis would find *benign* rocks if they existed. Here the
responses carry a discourse connective whose choice follows a rule the teacher can represent
and the student architecture cannot, while the answer does not depend on it::

    prompt    "<bos>d=thus k=so x=hence\\nk 3+4=\\n"
    response  "k=so answer: 7<eos>"

The prompt's first line binds three letters to three distinct connectives (drawn per prompt);
the second names one of those letters (the key) and a sum of two single digits. The response
repeats the key, then the connective bound to it, then the answer. Choosing the connective is an
induction-style lookup (find the earlier ``k=`` and copy the token after it): a 2-layer
transformer can represent it (a previous-token head, then a head matching on it), a 1-layer one cannot,
so the 1-layer student can do no better than pick one of the three connectives the prompt shows
(about 1/3). The answer (a one-step sum at fixed offsets) stays learnable by the 1-layer
student. Status: with the default ``PlantedSpec`` the teacher does not form the lookup (its
calibration fails; README, "The planted-rock testbed"). Truth: ``CONNECTIVES`` are the planted rock tokens; ``connective_position`` says where
each response carries one.

``build_planted`` trains the pair with the demo's machinery (infra/testbeds/demo.py: the tokenizer, the
Llama models, the training loop, the summaries) and runs the calibration check
(``calibrate``): teacher-forced accuracy at the planted positions and greedy answer accuracy,
for the teacher, the built student, and the student architecture trained long with
cross-entropy (``PlantedSpec.student_long_steps``). The models stage records it as its
metrics (``calibration``), before any distillation.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path
from typing import Callable

import pydantic

from opdflow.infra.testbeds import demo
from opdflow.infra.testbeds.demo import ANSWER_PATTERN, DemoSpec, ModelSpec

__all__ = ["CONNECTIVES", "WORDS", "ANSWER_PATTERN", "MAX_RESPONSE_TOKENS", "PlantedSpec", "format_problem",
           "make_examples", "extract_answer", "build_tokenizer", "connective_positions", "calibrate",
           "truth_overlap", "build_planted"]

# The planted tokens. "so" and "then" are demo words already; the others are added.
CONNECTIVES = ("so", "then", "thus", "hence", "also", "next")
WORDS = tuple(demo.WORDS) + tuple(w for w in CONNECTIVES if w not in demo.WORDS)
KEYS = tuple("bcdfgkmx")  # the key letters (few: each key recurs often enough for the lookup to be learnt fast)
N_PAIRS = 3    # key=connective pairs in the prompt's table
N_QUERIES = 2  # keys the response looks up, in the order the prompt's second line gives
MAX_RESPONSE_TOKENS = 14  # "k=so x=hence answer: 18<eos>"
_SPLIT_BOUNDS = {"train": (0, 80), "probe": (80, 90), "eval": (90, 100)}


class PlantedSpec(DemoSpec):
    """Everything that decides the planted testbed's models (the demo's fields, other defaults).

    The teacher has 2 layers (it can form an induction head); the student 1 (it cannot)."""

    teacher: ModelSpec = pydantic.Field(ModelSpec(
        hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        train_steps=1500, batch_size=64, lr=3e-3, stop_at_accuracy=None,
    ), description="the teacher: 2 layers, so it can form an induction head")
    student: ModelSpec = pydantic.Field(ModelSpec(
        hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
        train_steps=400, batch_size=64, lr=3e-3, stop_at_accuracy=0.3, check_every=10,
    ), description="the student: 1 layer, so it cannot")
    student_long_steps: int = pydantic.Field(default=1500, ge=0, description="cross-entropy steps of the "
                                             "calibration student (same architecture as the student)")
    n_calibration: int = pydantic.Field(default=256, ge=1, description="eval-split problems of the calibration "
                                        "check")

    @classmethod
    def tiny(cls) -> "PlantedSpec":
        """Working models in a few seconds, for tests; quality is irrelevant."""
        small = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, batch_size=32, lr=1e-2,
                     warmup_steps=5)
        return cls(teacher=ModelSpec(num_hidden_layers=2, train_steps=30, **small),
                   student=ModelSpec(num_hidden_layers=1, train_steps=10, **small),
                   student_long_steps=20, n_train=512, n_eval_check=16, n_calibration=16)


# ----------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------


def _split_of(prompt: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big") % 100
    return next(s for s, (lo, hi) in _SPLIT_BOUNDS.items() if lo <= bucket < hi)


def format_problem(pairs: list[tuple[str, str]], keys: list[str], a: int, b: int) -> dict:
    """One example: the table of `pairs`, the queried `keys` in that order, the sum a+b.
    ``connectives``: the planted tokens the response must carry, one per queried key."""
    bound = dict(pairs)
    for key in keys:
        if key not in bound:
            raise ValueError(f"key {key!r} is not bound in {pairs}")
    table = " ".join(f"{k}={c}" for k, c in pairs)
    answer = str(a + b)
    lookups = " ".join(f"{k}={bound[k]}" for k in keys)
    return {"prompt": f"{table}\n{' '.join(keys)} {a}+{b}=\n", "answer": answer,
            "connectives": [bound[k] for k in keys], "solution": f"{lookups} answer: {answer}"}


def make_examples(split: str, n: int, seed: int) -> list[dict]:
    """``n`` distinct problems of ``split``, drawn from ``seed``; splits never share a prompt."""
    if split not in _SPLIT_BOUNDS:
        raise ValueError(f"split must be one of {tuple(_SPLIT_BOUNDS)}, got {split!r}")
    rng = random.Random(f"opdflow-planted:{split}:{seed}")
    seen: set[str] = set()
    out: list[dict] = []
    while len(out) < n:
        keys = rng.sample(KEYS, N_PAIRS)
        pairs = list(zip(keys, rng.sample(CONNECTIVES, N_PAIRS)))
        ex = format_problem(pairs, rng.sample(keys, N_QUERIES), rng.randint(0, 9), rng.randint(0, 9))
        if ex["prompt"] in seen or _split_of(ex["prompt"]) != split:
            continue
        seen.add(ex["prompt"])
        out.append(ex)
    return out


extract_answer = demo.extract_answer  # the last ``answer: N`` (the one shared extraction)


def build_tokenizer():
    """The demo's tokenizer with the connectives as whole words."""
    return demo.build_tokenizer(WORDS)


def connective_positions(tokenizer, solution: str) -> list[int]:
    """Indices, within the response's token ids, of the planted connectives (the tokens after
    each ``=``)."""
    ids = tokenizer(solution, add_special_tokens=False)["input_ids"]
    eq = tokenizer.convert_tokens_to_ids("=")
    return [i + 1 for i, t in enumerate(ids) if t == eq]


# ----------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------


def planted_accuracy(model, tokenizer, examples: list[dict]) -> dict:
    """Teacher-forced on the reference responses, at the planted positions: the share whose
    argmax is the bound connective (`planted_accuracy`; `first_lookup_accuracy` at the first
    one only, where nothing can be inferred by elimination), and the share whose argmax is
    *one of the prompt's* connectives (`planted_in_prompt`: what a model that cannot do the
    lookup still gets right)."""
    import torch

    hits = shown = first = n_pos = 0
    model.eval()
    with torch.no_grad():
        for e in examples:
            p = tokenizer(e["prompt"])["input_ids"]
            r = tokenizer(e["solution"], add_special_tokens=False)["input_ids"]
            logits = model(input_ids=torch.tensor([p + r])).logits[0]
            table = {pair.split("=")[1] for pair in e["prompt"].split("\n")[0].split(" ")}
            for j, (i, want) in enumerate(zip(connective_positions(tokenizer, e["solution"]), e["connectives"])):
                word = tokenizer.convert_ids_to_tokens(int(logits[len(p) + i - 1].argmax()))
                hits += word == want
                shown += word in table
                first += j == 0 and word == want
                n_pos += 1
    return {"planted_accuracy": hits / max(1, n_pos), "first_lookup_accuracy": first / max(1, len(examples)),
            "planted_in_prompt": shown / max(1, n_pos), "n": len(examples), "n_positions": n_pos}


def calibrate(models: dict, tokenizer, examples: list[dict]) -> dict:
    """For each model: planted-position accuracy (teacher-forced) and greedy answer accuracy."""
    out = {}
    for name, model in models.items():
        out[name] = {**planted_accuracy(model, tokenizer, examples),
                     "answer_accuracy": demo.greedy_accuracy(model, tokenizer, examples, MAX_RESPONSE_TOKENS + 1)}
    out["chance_first_lookup"] = 1 / N_PAIRS  # a model that picks one of the prompt's connectives
    return out


def truth_overlap(tokenizer, rock_ids: list[int]) -> dict:
    """How the selected rock set compares with the planted truth (the connectives)."""
    planted_ids = [tokenizer.convert_tokens_to_ids(w) for w in CONNECTIVES]
    found = [t for t in rock_ids if t in planted_ids]
    return {"planted": list(CONNECTIVES), "rock": [tokenizer.decode([t]) for t in rock_ids],
            "found": [tokenizer.decode([t]) for t in found],
            "missed": [w for w, t in zip(CONNECTIVES, planted_ids) if t not in rock_ids],
            "recall": len(found) / len(planted_ids), "precision": len(found) / len(rock_ids) if rock_ids else 0.0}


# ----------------------------------------------------------------------------------------------
# The build
# ----------------------------------------------------------------------------------------------


def build_planted(spec: PlantedSpec, out_dir: Path,
                  progress: Callable[[str, float], None] | None = None) -> dict[str, Path]:
    """Train the teacher and the student (the demo's loop), then the calibration check; write
    the model dirs (``demo_summary.json`` beside each) and ``calibration.json`` under ``out_dir``."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    train = make_examples("train", spec.n_train, spec.seed)
    check = make_examples("eval", spec.n_eval_check, spec.seed)
    paths: dict[str, Path] = {}
    built = {}
    with demo._torch_threads(spec.torch_threads):
        pool = demo._encode_pool(train, tokenizer)
        for role in ("teacher", "student"):
            model, summary = demo._build_one(role, getattr(spec, role), spec, tokenizer, pool, train, check,
                                             progress, max_new_tokens=MAX_RESPONSE_TOKENS + 1)
            paths[role] = out_dir / role
            built[role] = model
            demo._save(model, tokenizer, paths[role], summary)
            if progress is not None:
                progress(role, 1.0)
        t0 = time.perf_counter()
        seed = spec.seed * 1000 + 2
        ms = spec.student.model_copy(update={"train_steps": spec.student_long_steps, "stop_at_accuracy": None})
        long_student = demo._make_model(ms, tokenizer, spec, seed=seed)
        long_stats = demo.train_model(long_student, ms, pool, seed=seed)
        cal = calibrate({"teacher": built["teacher"], "student": built["student"], "student_long_ce": long_student},
                        tokenizer, make_examples("eval", spec.n_calibration, spec.seed))
        cal["student_long_ce"].update(steps=long_stats["steps"], final_loss=long_stats["final_loss"])
        cal["seconds"] = round(time.perf_counter() - t0, 2)
        cal["planted_tokens"] = list(CONNECTIVES)
        (out_dir / "teacher" / "calibration.json").write_text(json.dumps(cal, indent=2, sort_keys=True))
        if progress is not None:
            progress("calibration", 1.0)
    return paths
