"""The embedded demo: a synthetic reasoning task, its tokenizer, and a teacher/student pair.

Why: opdflow's default lifecycle must run on a 2-core CPU with no model hub, so the demo makes its
own models. The task is three-digit addition worked digit by digit (units first) with explicit
carries, ending in a final ``answer: N`` line::

    prompt    "<bos>347+485=\\n"
    solution  "7+5=12 carry 1\\n4+8+1=13 carry 1\\n3+4+1=8 carry 0\\nso answer: 832<eos>"

Every step is local (two digits, a carry) so a tiny transformer learns it in seconds, and the
answer line needs the model to gather the written digits back in order: a real chain whose early
mistakes propagate, which is what on-policy distillation is meant to fix.

What is built (``build_demo``):
- a Hugging Face tokenizer (``tokenizers`` WordLevel + a regex pre-tokenizer + a Fuse decoder,
  saved with ``save_pretrained``): single digits, whitespace, punctuation, math symbols, lowercase
  letters and a few whole words ("carry", "so", "then", "answer", ...). Any text made of those
  characters round-trips exactly. ``<bos>`` is prepended by the tokenizer's post-processor
  (``add_special_tokens=True``, the default); the response ends with ``<eos>``; ``<pad>`` is
  distinct from both and padding is on the left (generation is the main use).
- a teacher (``LlamaForCausalLM``, random init from a seed) trained with teacher forcing until it
  solves the task (>= 90 % greedy exact match), and a smaller student trained only briefly, so it
  is clearly weak but has the capacity to learn the task (``DemoSpec.student_long_steps`` shows
  what the same architecture reaches with long training; ``measure_student_capacity`` runs it).
- beside each model dir a ``demo_summary.json``: steps, final loss, greedy accuracy on an eval
  sample, seconds.

Splits are disjoint by construction: a sha256 of the problem text decides whether it belongs to
train, probe or eval, whatever the seed; the seed only decides which problems are drawn.

How to run (about two minutes on 2 cores)::

    python -c "from pathlib import Path; from opdflow.infra.testbeds.demo import DemoSpec, build_demo; \\
               print(build_demo(DemoSpec(), Path('/tmp/opdflow-demo')))"

``DemoSpec.tiny()`` builds working (but untrained-quality) models in a few seconds for tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import time
from pathlib import Path
from typing import Callable, Iterator

import pydantic

__all__ = [
    "BOS",
    "EOS",
    "PAD",
    "UNK",
    "SPLITS",
    "ModelSpec",
    "DemoSpec",
    "make_examples",
    "format_problem",
    "extract_answer",
    "ANSWER_PATTERN",
    "build_tokenizer",
    "build_demo",
    "greedy_accuracy",
    "greedy_generate",
    "measure_student_capacity",
]

BOS, EOS, PAD, UNK = "<bos>", "<eos>", "<pad>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # ids 0..3, in this order
WORDS = ["answer", "carry", "then", "so", "add", "sum", "is"]
SYMBOLS = list("+-*=:?.,()")
WHITESPACE = [" ", "\n"]
SPLITS = ("train", "probe", "eval")
# Share of the problem space (by hash, in percent) that each split owns.
_SPLIT_BOUNDS = {"train": (0, 80), "probe": (80, 90), "eval": (90, 100)}
ANSWER_PATTERN = r"answer:\s*(-?\d+)"  # evals/tasks/opdflow_arith.yaml uses the same regex
MAX_RESPONSE_TOKENS = 47  # longest solution incl. <eos>; see format_problem


class ModelSpec(pydantic.BaseModel, extra="forbid", frozen=True):
    """Size and training budget of one demo model (a small Llama)."""

    hidden_size: int = pydantic.Field(gt=0, description="the Llama's hidden size")
    intermediate_size: int = pydantic.Field(gt=0, description="the MLP's inner size")
    num_hidden_layers: int = pydantic.Field(gt=0, description="transformer layers")
    num_attention_heads: int = pydantic.Field(gt=0, description="attention heads (dividing hidden_size)")
    train_steps: int = pydantic.Field(ge=0, description="most cross-entropy steps on the solutions")
    batch_size: int = pydantic.Field(default=64, gt=0, description="problems per training step")
    lr: float = pydantic.Field(default=3e-3, gt=0, description="AdamW learning rate (after warmup)")
    warmup_steps: int = pydantic.Field(default=30, ge=0, description="linear learning-rate warmup steps")
    weight_decay: float = pydantic.Field(default=0.01, ge=0, description="AdamW weight decay")
    # Early stop: every ``check_every`` steps, greedy accuracy on ``n_check`` train-split problems;
    # stop as soon as it reaches ``stop_at_accuracy``. This is how the student is made "weak but not
    # hopeless" robustly: its learning curve is steep, so a fixed step count would land anywhere
    # between 0 % and 90 % depending on the machine's float rounding. None = train all steps.
    stop_at_accuracy: float | None = pydantic.Field(default=None, gt=0, le=1, description="stop training once "
                                                    "greedy accuracy on n_check train problems reaches this; "
                                                    "unset: train all train_steps")
    check_every: int = pydantic.Field(default=10, gt=0, description="steps between early-stop checks")
    n_check: int = pydantic.Field(default=64, gt=0, description="train-split problems of each early-stop check")

    @pydantic.model_validator(mode="after")
    def _heads_divide_width(self) -> "ModelSpec":
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        return self


class DemoSpec(pydantic.BaseModel, extra="forbid", frozen=True):
    """Everything that decides the demo models; the defaults are the real demo."""

    seed: int = pydantic.Field(default=0, description="seed of the models' training problems and weights")
    max_position_embeddings: int = pydantic.Field(default=128, gt=64, description="the models' context length")
    teacher: ModelSpec = pydantic.Field(ModelSpec(
        hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
        train_steps=400, batch_size=64, lr=3e-3, stop_at_accuracy=1.0, check_every=25, n_check=128,
    ), description="the teacher: trained until it solves the task")
    student: ModelSpec = pydantic.Field(ModelSpec(
        hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2,
        train_steps=400, batch_size=64, lr=3e-3, stop_at_accuracy=0.25,
    ), description="the student: stopped early, weak but able to learn the task")
    # Steps for the capacity check (same student architecture, long training); not part of the build.
    student_long_steps: int = pydantic.Field(default=1500, ge=0, description="steps of the capacity check (the "
                                             "student's architecture trained long); not part of the build")
    n_train: int = pydantic.Field(default=20000, gt=0, description="distinct training problems in the pool")
    n_eval_check: int = pydantic.Field(default=256, ge=0, description="eval-split problems for the build's "
                                       "summary JSON")
    torch_threads: int = pydantic.Field(default=2, gt=0, description="torch threads while the models are built")

    @classmethod
    def tiny(cls) -> "DemoSpec":
        """Working models in a few seconds, for tests; quality is irrelevant."""
        small = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, batch_size=32,
                     lr=1e-2, warmup_steps=5)
        return cls(
            teacher=ModelSpec(num_hidden_layers=2, train_steps=40, **small),
            student=ModelSpec(num_hidden_layers=1, train_steps=20, **small),
            student_long_steps=40,
            n_train=512,
            n_eval_check=16,
        )


# ----------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------


def _split_of(a: int, b: int) -> str:
    bucket = int.from_bytes(hashlib.sha256(f"{a}+{b}".encode()).digest()[:4], "big") % 100
    return next(s for s, (lo, hi) in _SPLIT_BOUNDS.items() if lo <= bucket < hi)


def format_problem(a: int, b: int) -> dict:
    """One example: the prompt ends where the response begins; the solution ends with the answer."""
    lines, carry = [], 0
    for i, (da, db) in enumerate(zip(reversed(str(a)), reversed(str(b)))):
        s = int(da) + int(db) + carry
        lhs = f"{da}+{db}" if i == 0 else f"{da}+{db}+{carry}"
        carry = s // 10
        lines.append(f"{lhs}={s} carry {carry}")
    answer = str(a + b)
    return {
        "prompt": f"{a}+{b}=\n",
        "answer": answer,
        "solution": "\n".join(lines) + f"\nso answer: {answer}",
    }


def make_examples(split: str, n: int, seed: int) -> list[dict]:
    """``n`` distinct problems of ``split`` (train/probe/eval), drawn deterministically from ``seed``.

    Splits never share a problem, whatever the seeds: membership is a hash of the problem.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    lo, hi = _SPLIT_BOUNDS[split]
    capacity = 900 * 900 * (hi - lo) // 100
    if n > capacity // 2:
        raise ValueError(f"n={n} too large for split {split!r} (about {capacity} problems)")
    rng = random.Random(f"opdflow-demo:{split}:{seed}")
    seen: set[tuple[int, int]] = set()
    out: list[dict] = []
    while len(out) < n:
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        if (a, b) in seen or _split_of(a, b) != split:
            continue
        seen.add((a, b))
        out.append(format_problem(a, b))
    return out


def extract_answer(text: str) -> str | None:
    """The number on the last ``answer: N`` in ``text`` (special tokens ignored), or None."""
    from opdflow.evals.answers import extract_answer as extract
    return extract(text, ANSWER_PATTERN)


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------


def _vocab(words: tuple[str, ...] | list[str] = tuple(WORDS)) -> list[str]:
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    digits = [str(d) for d in range(10)]
    return SPECIAL_TOKENS + digits + WHITESPACE + SYMBOLS + list(words) + letters


def build_tokenizer(words: tuple[str, ...] | list[str] = tuple(WORDS)):
    """A small exact-round-trip ``PreTrainedTokenizerFast`` (see the module docstring).

    ``words``: the whole-word tokens (the demo's by default; the planted testbed,
    infra/testbeds/planted.py, adds its connectives)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_vocab(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Whole words first (longest first), else one character: every piece is a vocabulary entry.
    words = "|".join(sorted(words, key=len, reverse=True))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(rf"{words}|[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=128,
    )


# ----------------------------------------------------------------------------------------------
# Models and training
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(min(n, old) if old > 0 else n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _make_model(ms: ModelSpec, tokenizer, spec: DemoSpec, seed: int, attention_bias: bool = False):
    """A freshly initialised small Llama (``attention_bias``: q/k/v/o biases, which the planted
    teacher's installed lookup needs, infra/testbeds/planted.py)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=ms.hidden_size,
        intermediate_size=ms.intermediate_size,
        num_hidden_layers=ms.num_hidden_layers,
        num_attention_heads=ms.num_attention_heads,
        num_key_value_heads=ms.num_attention_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=0.02,
        attention_bias=attention_bias,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def _encode_pool(examples: list[dict], tokenizer):
    """Right-padded ``input_ids`` and a loss mask that is 1 on response tokens (incl. ``<eos>``)."""
    import torch

    prompts = tokenizer([e["prompt"] for e in examples])["input_ids"]
    responses = tokenizer([e["solution"] for e in examples], add_special_tokens=False)["input_ids"]
    seqs = [p + r + [tokenizer.eos_token_id] for p, r in zip(prompts, responses)]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, len(p) : len(s)] = True
    return ids, mask


def _lr_at(step: int, ms: ModelSpec) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < ms.warmup_steps:
        return ms.lr * (step + 1) / ms.warmup_steps
    frac = (step - ms.warmup_steps) / max(1, ms.train_steps - ms.warmup_steps)
    return ms.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def _loss_step(model, ids, mask):
    """Mean next-token cross-entropy over response positions (teacher forcing)."""
    import torch.nn.functional as F

    width = int(mask.any(0).nonzero().max()) + 1  # trim all-padding columns
    ids, mask = ids[:, :width], mask[:, :width]
    logits = model(input_ids=ids[:, :-1], attention_mask=None).logits
    targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)


def train_model(model, ms: ModelSpec, pool, seed: int,
                progress: Callable[[float, float], None] | None = None,
                check: Callable[[], float] | None = None,
                after_step: Callable[[], None] | None = None) -> dict:
    """Plain AdamW loop over random batches of the pool; returns steps, final loss, seconds.

    With ``ms.stop_at_accuracy`` and a ``check`` (greedy accuracy of the model), training stops at
    the first check that reaches it. ``after_step`` runs after every optimizer step (the planted
    teacher rewrites its installed lookup there, so training cannot move it).
    """
    import torch

    ids, mask = pool
    steps = ms.train_steps
    opt = torch.optim.AdamW(model.parameters(), lr=ms.lr, betas=(0.9, 0.98),
                            weight_decay=ms.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t0, ema, last_check = time.perf_counter(), None, None
    step = -1
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, ms)
        rows = torch.randint(0, ids.size(0), (ms.batch_size,), generator=gen)
        loss = _loss_step(model, ids[rows], mask[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if after_step is not None:
            after_step()
        if step % 25 == 0 or step == steps - 1:
            # .item() syncs, but this is CPU and only every 25 steps.
            value = loss.item()
            ema = value if ema is None else 0.7 * ema + 0.3 * value
            if progress is not None:
                progress((step + 1) / max(1, steps), value)
        if check is not None and ms.stop_at_accuracy is not None and (step + 1) % ms.check_every == 0:
            last_check = check()
            model.train()
            if last_check >= ms.stop_at_accuracy:
                ema = loss.item()
                break
    model.eval()
    return {"steps": step + 1, "final_loss": ema, "stopped_at_check_accuracy": last_check,
            "seconds": round(time.perf_counter() - t0, 2)}


def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int,
                    batch_size: int = 64) -> list[str]:
    """Greedy continuations (special tokens stripped), decoded by the one decode loop
    (`infra.models.lm.sample` at temperature 0: batched, left-padded, KV-cached)."""
    from opdflow.infra.models.lm import SampleSettings, sample

    ids = [tokenizer(p)["input_ids"] for p in prompts]
    st = SampleSettings(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens,
                        batch_size=batch_size, vocab_size=len(tokenizer))
    out = sample(model, ids, list(range(len(ids))), st, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return tokenizer.batch_decode([s.response_ids for s in out], skip_special_tokens=True)


def greedy_accuracy(model, tokenizer, examples: list[dict], max_new_tokens: int,
                    batch_size: int = 64) -> float:
    """Share of examples whose greedy response's ``answer: N`` equals the reference answer."""
    if not examples:
        return float("nan")
    responses = greedy_generate(model, tokenizer, [e["prompt"] for e in examples],
                                max_new_tokens, batch_size)
    hits = sum(extract_answer(r) == e["answer"] for r, e in zip(responses, examples))
    return hits / len(examples)


def _save(model, tokenizer, path: Path, summary: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    (path / "demo_summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))


def _build_one(role: str, ms: ModelSpec, spec: DemoSpec, tokenizer, pool, train: list[dict],
               check: list[dict], progress: Callable[[str, float], None] | None,
               max_new_tokens: int = MAX_RESPONSE_TOKENS + 1,
               install: Callable[[object], Callable[[], None]] | None = None):
    """Initialise and train one model; returns it with its summary.

    ``install(model)`` (the planted teacher's lookup) writes fixed weights into the fresh model
    (built with attention biases) and returns what rewrites them after every step."""
    t0 = time.perf_counter()
    seed = spec.seed * 1000 + (0 if role == "teacher" else 1)
    model = _make_model(ms, tokenizer, spec, seed=seed, attention_bias=install is not None)
    after_step = install(model) if install is not None else None
    report = (lambda frac, loss: progress(role, frac)) if progress else None
    # Early-stop checks use training problems: no decision ever looks at the eval split.
    stop_check = train[: ms.n_check]
    stats = train_model(
        model, ms, pool, seed=seed, progress=report,
        check=lambda: greedy_accuracy(model, tokenizer, stop_check, max_new_tokens),
        after_step=after_step,
    )
    summary = {
        "role": role,
        **stats,
        "eval_greedy_accuracy": greedy_accuracy(model, tokenizer, check, max_new_tokens),
        "eval_examples": len(check),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "model_spec": ms.model_dump(),
        "seed": spec.seed,
        "seconds_total": round(time.perf_counter() - t0, 2),
    }
    return model, summary


def build_demo(spec: DemoSpec, out_dir: Path,
               progress: Callable[[str, float], None] | None = None) -> dict[str, Path]:
    """Train the teacher and the student; write them as HF model dirs under ``out_dir``.

    ``progress(label, fraction)`` is called now and then (label ``"teacher"``/``"student"``).
    Returns ``{"teacher": out_dir/"teacher", "student": out_dir/"student"}``; beside each model's
    weights, ``demo_summary.json`` holds its training summary.
    """
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    train = make_examples("train", spec.n_train, spec.seed)
    check = make_examples("eval", spec.n_eval_check, spec.seed)
    paths: dict[str, Path] = {}
    with _torch_threads(spec.torch_threads):
        pool = _encode_pool(train, tokenizer)
        for role in ("teacher", "student"):
            model, summary = _build_one(role, getattr(spec, role), spec, tokenizer, pool, train,
                                        check, progress)
            paths[role] = out_dir / role
            _save(model, tokenizer, paths[role], summary)
            if progress is not None:
                progress(role, 1.0)
    return paths


def measure_student_capacity(spec: DemoSpec, n_eval: int = 256, steps: int | None = None) -> dict:
    """Train the student architecture for ``spec.student_long_steps``: what it *could* reach.

    Not part of the build (it takes minutes); used to check that the student's weakness is lack of
    training, not of capacity, i.e. that OPD has a gap to close.
    """
    tokenizer = build_tokenizer()
    steps = spec.student_long_steps if steps is None else steps
    ms = spec.student.model_copy(update={"train_steps": steps, "stop_at_accuracy": None})
    with _torch_threads(spec.torch_threads):
        pool = _encode_pool(make_examples("train", spec.n_train, spec.seed), tokenizer)
        model = _make_model(ms, tokenizer, spec, seed=spec.seed * 1000 + 1)
        stats = train_model(model, ms, pool, seed=spec.seed * 1000 + 1)
        acc = greedy_accuracy(model, tokenizer, make_examples("eval", n_eval, spec.seed),
                              MAX_RESPONSE_TOKENS + 1)
    return {**stats, "eval_greedy_accuracy": acc, "eval_examples": n_eval}
