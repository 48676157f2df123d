"""The planted-rock testbed: a built-in task where the rock tokens are known by construction.

Why: on the arithmetic demo the highest-KL tokens are the digits that carry the answer, so it
cannot tell whether the rock analysis would find *benign* rocks if they existed. Here the
responses carry a discourse connective whose choice follows a rule the teacher can represent
and the student architecture cannot, while the answer does not depend on it::

    prompt    "<bos>d=thus k=so x=hence\\nk d 3+4=\\n"
    response  "k=so d=thus answer: 7<eos>"

The prompt's first line binds three letters to three distinct connectives (drawn per prompt);
the second names two of those letters (the keys) and a sum of two single digits. The response
repeats each key, then the connective bound to it, then the answer. Choosing the connective is an
induction-style lookup (find the earlier ``k=`` and copy the token after it): a 2-layer
transformer can represent it (a previous-token head, then a head matching on it), a 1-layer one cannot,
so the 1-layer student can do no better than pick one of the three connectives the prompt shows
(about 1/3 at the first lookup, 1/2 at the second if it avoids repeating the first). The answer (a one-step sum at fixed offsets) stays learnable by the 1-layer
student. Gradient descent alone did not form the lookup in the teacher (README, "The
planted-rock testbed"), so by default ``install_lookup`` writes the induction circuit into the
teacher's weights and holds it fixed while the rest of the teacher trains on the task
(``PlantedSpec.teacher_lookup``). Truth: ``CONNECTIVES`` are the planted rock tokens;
``connective_positions`` says where each response carries one.

``build_planted`` trains the pair with the demo's machinery (infra/testbeds/demo.py: the tokenizer, the
Llama models, the training loop, the summaries; the teacher with attention biases and its installed
lookup) and runs the calibration check
(``calibrate``): teacher-forced accuracy at the planted positions and greedy answer accuracy,
for the teacher, the built student, and the student architecture trained long with
cross-entropy (``PlantedSpec.student_long_steps``). The models stage records it as its
metrics (``calibration``), before any distillation.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import time
from pathlib import Path
from typing import Callable, Literal

import pydantic

from opdflow.infra.testbeds import demo
from opdflow.infra.testbeds.demo import ANSWER_PATTERN, DemoSpec, ModelSpec

__all__ = ["CONNECTIVES", "WORDS", "ANSWER_PATTERN", "MAX_RESPONSE_TOKENS", "PlantedSpec", "format_problem",
           "make_examples", "extract_answer", "build_tokenizer", "connective_positions", "calibrate",
           "truth_overlap", "with_connective_noise", "install_lookup", "MAX_LOOKUP_DISTANCE", "build_planted"]

# The planted tokens. "so" and "then" are demo words already; the others are added.
CONNECTIVES = ("so", "then", "thus", "hence", "also", "next")
WORDS = tuple(demo.WORDS) + tuple(w for w in CONNECTIVES if w not in demo.WORDS)
KEYS = tuple("bcdfgkmx")  # the key letters (install_lookup gives each a code: 8 fit a 16-dim head)
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
    ), description="the teacher: 2 layers, so it can hold an induction head")
    student: ModelSpec = pydantic.Field(ModelSpec(
        hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
        train_steps=400, batch_size=64, lr=3e-3, stop_at_accuracy=0.3, check_every=10,
    ), description="the student: 1 layer, so it cannot")
    teacher_lookup: Literal["installed", "learned"] = pydantic.Field(
        default="installed", description="installed: the lookup circuit is written into the teacher's first two "
        "layers (install_lookup) and held fixed while everything else trains; learned: the teacher trains from "
        "its random initialisation alone (gradient descent did not form the lookup in the trials the README lists)")
    connective_noise: float = pydantic.Field(
        default=0.1, ge=0, lt=1, description="share of the training solutions' connectives replaced by one of "
        "the other connectives: the teacher then prefers the bound one (about 1 - noise) instead of ruling the "
        "others out (an exact teacher put about -30 nats on them, and OPD taught the student to write no "
        "connective at all; README)")
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
    connectives = [bound[k] for k in keys]
    return {"prompt": f"{table}\n{' '.join(keys)} {a}+{b}=\n", "answer": answer,
            "connectives": connectives, "solution": _solution(keys, connectives, answer)}


def _solution(keys: list[str], connectives: list[str], answer: str) -> str:
    """The response: each key with the connective written for it, then the answer."""
    lookups = " ".join(f"{k}={c}" for k, c in zip(keys, connectives))
    return f"{lookups} answer: {answer}"


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


def with_connective_noise(examples: list[dict], noise: float, seed: int) -> list[dict]:
    """Copies of ``examples`` whose solutions carry, at each planted position independently with
    probability ``noise``, one of the other connectives instead of the bound one (the models'
    training data; prompts, answers and the truth ``connectives`` are unchanged)."""
    rng = random.Random(f"opdflow-planted-noise:{seed}")
    out = []
    for e in examples:
        written = [rng.choice([c for c in CONNECTIVES if c != want]) if rng.random() < noise else want
                   for want in e["connectives"]]
        keys = e["prompt"].split("\n")[1].split(" ")[:len(written)]
        out.append({**e, "solution": _solution(keys, written, e["answer"])})
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
# The teacher's lookup, installed
# ----------------------------------------------------------------------------------------------

MAX_LOOKUP_DISTANCE = 40  # tokens between a lookup and the table entry it reads, at most (tested)


def _simplex(n: int):
    """``n`` unit vectors in n-1 dimensions whose pairwise inner products are all -1/(n-1)."""
    import torch

    centred = torch.eye(n, dtype=torch.float64) - 1.0 / n
    u, s, _ = torch.linalg.svd(centred)
    return torch.nn.functional.normalize(u[:, : n - 1] * s[: n - 1], dim=1).float()


def _positional_qk(head_dim: int, inv_freq, offset: int, margin: float = 12.0, n_freq: int = 3):
    """q and k biases of a head whose RoPE score depends on the distance alone and peaks at
    ``offset`` tokens back, ``margin`` nats above any other distance up to 128 (the highest
    ``n_freq`` frequencies, which tell neighbouring distances apart)."""
    import torch

    half = head_dim // 2
    use = torch.zeros(half)
    use[:n_freq] = 1.0
    dist = torch.arange(0, 128).float()
    score = (use[None] * torch.cos((dist[:, None] - offset) * inv_freq[None])).sum(1)
    gap = float(score[offset] - torch.cat([score[:offset], score[offset + 1:]]).max())
    amp = math.sqrt(margin * math.sqrt(head_dim) / gap)
    q = torch.cat([amp * use, torch.zeros(half)])
    k = torch.cat([amp * use * torch.cos(offset * inv_freq), amp * use * torch.sin(offset * inv_freq)])
    return q, k


def install_lookup(model, tokenizer, seed: int = 0, match: float = 16.0, table_bonus: float = 16.0,
                   copy: float = 8.0, row_norm: float = 1.0) -> Callable[[], None]:
    """Write the induction lookup into a fresh 2-layer Llama built with attention biases; return
    ``restore()``, which rewrites every installed weight (call it after each optimizer step).

    Why: gradient descent did not form this lookup in the trials the README lists (the teacher
    stays on the "pick one of the shown connectives" plateau), and the testbed needs a teacher
    that *knows* the rule. The circuit is the textbook two-layer induction head:

    * layer 0, head 0 attends to the previous token (q and k are biases only, so its RoPE score
      depends on distance alone) and writes a code of that token into a subspace A: key letters
      get simplex codes (any two differ: inner product -1/7), ``=`` one extra dimension;
    * layer 0, head 1 does the same two tokens back (key codes only), into a subspace B;
    * layer 1, head 0 matches the query's A-code (at the ``=`` after a key in the response: the
      key) against the B-codes (at a connective in the table: its key), plus ``table_bonus``
      where A says the previous token is ``=`` (so the table's ``k=so`` wins over the second
      line's ``k x``); q and k live in RoPE's lowest frequencies, so the match is nearly free of
      distance; its value and output copy the attended connective's embedding direction;
    * layer 0's output bias adds a large constant direction that layer 1's output bias takes
      away again: it dominates layer 1's input, so its RMSNorm scales every position alike and
      ``match`` and ``table_bonus`` are scores in nats wherever they are read.

    The embedding rows of the keys, ``=`` and the connectives are set orthogonal, of norm
    ``row_norm`` (the tied unembedding caps a connective's logit by its row's norm: at the
    initialisation's 0.02 scale the lookup's vote was outgrown by the other tokens' trained rows
    within a few steps), and held fixed too; the codes and the copy are written at that size.
    Everything else (the answer, echoing the keys, the rest of each layer) trains around the
    lookup. ``match``, ``table_bonus`` and ``copy`` scale the match, the table bonus and the copy.
    """
    import torch

    cfg = model.config
    heads, width = cfg.num_attention_heads, cfg.hidden_size
    head_dim = width // heads
    if type(model).__name__ != "LlamaForCausalLM" or not cfg.attention_bias:
        raise ValueError("install_lookup needs a LlamaForCausalLM built with attention_bias=True")
    if cfg.num_hidden_layers < 2 or heads < 2:
        raise ValueError(f"install_lookup needs >= 2 layers and >= 2 heads, got {cfg.num_hidden_layers} and {heads}")
    inv_freq = model.model.rotary_emb.inv_freq.float()  # the model's own RoPE frequencies
    n_keys = len(KEYS)
    slow = [int(i) for i in torch.argsort(inv_freq) if inv_freq[i] * MAX_LOOKUP_DISTANCE <= 0.5]
    half = head_dim // 2
    if 2 * len(slow) < n_keys:
        raise ValueError(f"head_dim {head_dim} has {len(slow)} RoPE frequencies slow enough for the lookup, "
                         f"it needs {(n_keys + 1) // 2}")
    # One dimension of the slowest pair holds the "previous token is '='" bonus, the others the key
    # code (n_keys - 1 dimensions); over MAX_LOOKUP_DISTANCE these pairs turn by at most 0.5 rad.
    bonus_dim = slow[0] + half
    match_dims = slow[1:] + [i + half for i in slow[1:]] + [slow[0]]
    key_ids = tokenizer.convert_tokens_to_ids(list(KEYS))
    eq_id = tokenizer.convert_tokens_to_ids("=")
    conn_ids = tokenizer.convert_tokens_to_ids(list(CONNECTIVES))
    coded = key_ids + [eq_id]
    fixed = coded + conn_ids
    if width < len(fixed) + 2 * n_keys + 1:
        raise ValueError(f"hidden_size {width} is too small for the lookup (needs {len(fixed) + 2 * n_keys + 1})")

    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(width, len(fixed) + 2 * n_keys + 1, generator=gen))
    emb = model.model.embed_tokens.weight
    with torch.no_grad():
        emb[fixed] = basis[:, : len(fixed)].T * row_norm
        normed = torch.nn.functional.normalize(emb[coded], dim=1) * math.sqrt(width)  # RMSNorm, weight 1
        read = torch.linalg.pinv(normed.T)  # (len(coded), width): read @ normed.T = I
    sub_a = basis[:, len(fixed): len(fixed) + n_keys]
    sub_b = basis[:, len(fixed) + n_keys: len(fixed) + 2 * n_keys]
    steady = basis[:, -1]  # a constant direction: layer 0 adds it, layer 1 takes it away
    bulk = 8.0 * row_norm  # it dominates layer 1's input, so RMSNorm scales every position alike
    code_size = math.sqrt(width) * row_norm / bulk  # a unit code's size after layer 1's RMSNorm
    conn_dirs = basis[:, len(coded): len(fixed)]
    codes = _simplex(n_keys).T  # (n_keys - 1, n_keys)
    code_a = torch.zeros(n_keys, len(coded))
    code_a[: n_keys - 1, :n_keys] = codes
    code_a[n_keys - 1, n_keys] = 1.0  # '='
    code_b = torch.zeros(n_keys, len(coded))
    code_b[: n_keys - 1, :n_keys] = codes

    installed: list[tuple] = []

    def put(param, index, value):
        installed.append((param, index, value))

    layer0, layer1 = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    for head, (offset, code, sub) in enumerate(((1, code_a, sub_a), (2, code_b, sub_b))):
        rows = slice(head * head_dim, (head + 1) * head_dim)
        q, k = _positional_qk(head_dim, inv_freq, offset)
        value = torch.zeros(head_dim, width)
        value[:n_keys] = code @ read
        out = torch.zeros(width, head_dim)
        out[:, :n_keys] = row_norm * sub  # the code, at the size of a fixed embedding row
        for proj, weight, bias in ((layer0.q_proj, torch.zeros(head_dim, width), q),
                                   (layer0.k_proj, torch.zeros(head_dim, width), k),
                                   (layer0.v_proj, value, torch.zeros(head_dim))):
            put(proj.weight, rows, weight)
            put(proj.bias, rows, bias)
        put(layer0.o_proj.weight, (slice(None), rows), out)
    put(layer0.o_proj.bias, slice(None), bulk * steady)
    put(layer1.o_proj.bias, slice(None), -bulk * steady)
    # Scores in nats: a key match adds `match`, a previous '=' adds `table_bonus`.
    w_match = math.sqrt(match * math.sqrt(head_dim)) / code_size
    w_bonus = table_bonus * math.sqrt(head_dim) / code_size
    rows = slice(0, head_dim)
    wq, wk, bq = torch.zeros(head_dim, width), torch.zeros(head_dim, width), torch.zeros(head_dim)
    for c, dim in enumerate(match_dims[: n_keys - 1]):
        wq[dim], wk[dim] = w_match * sub_a[:, c], w_match * sub_b[:, c]
    bq[bonus_dim], wk[bonus_dim] = w_bonus, sub_a[:, n_keys - 1]
    value, out = torch.zeros(head_dim, width), torch.zeros(width, head_dim)
    value[: len(conn_ids)] = conn_dirs.T / code_size
    out[:, : len(conn_ids)] = copy * row_norm * conn_dirs
    for proj, weight, bias in ((layer1.q_proj, wq, bq), (layer1.k_proj, wk, torch.zeros(head_dim)),
                               (layer1.v_proj, value, torch.zeros(head_dim))):
        put(proj.weight, rows, weight)
        put(proj.bias, rows, bias)
    put(layer1.o_proj.weight, (slice(None), rows), out)
    for layer in model.model.layers[:2]:
        put(layer.input_layernorm.weight, slice(None), torch.ones(width))
    put(emb, fixed, emb[fixed].detach().clone())

    def restore() -> None:
        with torch.no_grad():
            for param, index, value in installed:
                param[index] = value

    restore()
    return restore


# ----------------------------------------------------------------------------------------------
# The build
# ----------------------------------------------------------------------------------------------


def build_planted(spec: PlantedSpec, out_dir: Path,
                  progress: Callable[[str, float], None] | None = None) -> dict[str, Path]:
    """Train the teacher and the student (the demo's loop), then the calibration check; write
    the model dirs (``demo_summary.json`` beside each) and ``calibration.json`` under ``out_dir``."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    train = with_connective_noise(make_examples("train", spec.n_train, spec.seed), spec.connective_noise, spec.seed)
    check = make_examples("eval", spec.n_eval_check, spec.seed)
    paths: dict[str, Path] = {}
    built = {}
    with demo._torch_threads(spec.torch_threads):
        pool = demo._encode_pool(train, tokenizer)
        for role in ("teacher", "student"):
            install = (lambda m: install_lookup(m, tokenizer, seed=spec.seed)) \
                if role == "teacher" and spec.teacher_lookup == "installed" else None
            model, summary = demo._build_one(role, getattr(spec, role), spec, tokenizer, pool, train, check,
                                             progress, max_new_tokens=MAX_RESPONSE_TOKENS + 1, install=install)
            summary["lookup"] = spec.teacher_lookup if role == "teacher" else None
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
