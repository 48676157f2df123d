"""Running causal LMs: loading, seeded sampling, and teacher-forced response logits.

Every stage that touches a model goes through here, so a Hugging Face model dir and the
embedded demo model are loaded the same way (`AutoModelForCausalLM`/`AutoTokenizer`,
offline: nothing is fetched from a hub).

Sampling is *per-sequence seeded*: the randomness for token t of a sequence is a pure
function of (the sequence's seed, t, token id), computed by an integer hash and turned
into Gumbel noise (Gumbel-max is an exact categorical sample). Results therefore do not
depend on batch composition, shard boundaries, worker count or device, which is what
lets stages shard without changing results. The logprob we report for each sampled
token is under the distribution actually sampled from (temperature applied, top-p
renormalized); with temperature 1 and top-p 1 that is the model's own distribution.

Padded vocabularies: real checkpoints often have more lm_head rows than tokenizer tokens
(Qwen: 151,936 rows, 151,665 tokens); the rows beyond the tokenizer are no tokens at all. The
tokenizer's size (`real_vocab`) is the vocabulary everywhere: `SampleSettings.vocab_size` cuts
the logits to it before sampling (`pick_tokens`, shared by every local backend), and the
teacher-forced helpers here, the scorer (`infra.models.scoring`), the train step and the rock analysis
cut their logits (or the lm_head's rows) the same way (`real_logits`, `real_head`).
"""
from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from opdflow.infra.config import ModelConfig, RolloutConfig, default

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def offline() -> None:
    """No hub at run time: make transformers, datasets and lm-eval fail instead of fetching."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_tokenizer(model_dir: str | Path):
    offline()
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


# Models are built one at a time per process: transformers' `from_pretrained` builds a model
# on the meta device and fills it from the checkpoint while process-wide patches are in
# place (torch.nn.init's functions and torch.linspace replaced), and two loads at once in
# threads left meta tensors behind ("Cannot copy out of meta tensor", seen when the flow
# first ran two rollouts side by side). The flow runs stages as threads at the same time
# (flows/lifecycle.run_stages): every from_pretrained of a model, ours and lm-eval's
# (evals/harness.py), holds this lock. Tokenizers and forward passes do not.
MODEL_LOAD_LOCK = threading.RLock()


def load_model(model_dir: str | Path, dtype: str = default(ModelConfig, "dtype"), dev: torch.device | None = None):
    offline()
    from transformers import AutoModelForCausalLM
    try:
        with MODEL_LOAD_LOCK:
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=_DTYPES[dtype])
    except Exception as e:
        if "SafetensorError" not in {c.__name__ for c in type(e).__mro__}:
            raise
        from opdflow.infra.failures import WEIGHTS_HINT, PermanentFailure, check_weights_dir
        bad = "; ".join(f"{f}: {why}" for f, why in check_weights_dir(model_dir)) or f"a *.safetensors file in {model_dir}"
        raise PermanentFailure(f"cannot load the weights of {model_dir}: {bad} (SafetensorError: {e}) -- "
                               f"{WEIGHTS_HINT}") from e
    return model.to(dev or device())


def save_model(model, tokenizer, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def real_vocab(tokenizer) -> int:
    """The vocabulary as the tokenizer defines it (regular + added tokens): ids at or beyond it
    are padded lm_head rows, never tokens."""
    return len(tokenizer)


def real_logits(logits: torch.Tensor, vocab: int | None) -> torch.Tensor:
    """`logits[..., :vocab]`: the padded lm_head rows cut off (a view; `None` keeps all)."""
    return logits if vocab is None or vocab >= logits.shape[-1] else logits[..., :vocab]


def real_head(head, vocab: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [V, H], bias [V] or None) of an lm_head, its padded rows cut off (views, so
    gradients reach the head's parameters)."""
    w, b = head.weight, getattr(head, "bias", None)
    if vocab is not None and vocab < w.shape[0]:
        w, b = w[:vocab], (None if b is None else b[:vocab])
    return w, b


def model_rows(model) -> int:
    """The number of lm_head rows (logits per position) a causal LM produces."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def context_length(model_dir: str | Path) -> int:
    offline()
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(str(model_dir))
    return int(getattr(cfg, "max_position_embeddings", 0) or 0)


# -- seeds --------------------------------------------------------------------------------

def derive_seed(*parts: object) -> int:
    """A 31-bit seed from any tuple (run seed, stage, prompt id, sample index...)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little") & 0x7FFFFFFF


_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply), on int64 tensors holding uint32 values."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, step: int | torch.Tensor, vocab: int, dev: torch.device) -> torch.Tensor:
    """U(0,1) noise of shape [B, V], a pure function of (seed, step, token id), float64.

    `step` is one int for every row, or a [B] tensor of per-row steps (the native sampler's
    slots are at different steps); integer arithmetic, so both give bit-identical noise."""
    if isinstance(step, torch.Tensor):
        step = step.to(dev, torch.int64)
    s = _mix32(seeds.to(dev, torch.int64) * 0x9E3779B1 + step)
    v = torch.arange(vocab, device=dev, dtype=torch.int64)
    x = _mix32(_mix32(s[:, None] ^ (v[None, :] * 0x85EBCA6B)) + s[:, None])
    return (x.double() + 0.5) / 4294967296.0


def sampling_logprobs(logits: torch.Tensor, temperature: float, top_p: float, top_k: int = 0) -> torch.Tensor:
    """Log-probs of the distribution sampled from: logits/temperature, then top-k (0 = off; ties
    with the k-th value are kept), then top-p on what is left, renormalized at each cut."""
    logp = torch.log_softmax(logits.float() / max(temperature, 1e-6), dim=-1)
    if 0 < top_k < logp.shape[-1]:
        kth = logp.topk(top_k, dim=-1).values[..., -1:]
        logp = torch.log_softmax(logp.masked_fill(logp < kth, float("-inf")), dim=-1)
    if top_p < 1.0:
        sorted_lp, idx = logp.sort(dim=-1, descending=True)
        cum = sorted_lp.exp().cumsum(-1)
        drop_sorted = (cum - sorted_lp.exp()) >= top_p  # keep the smallest prefix reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        logp = torch.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)
    return logp


@dataclass(frozen=True)
class SampleSettings:
    """How responses are sampled; the defaults are `rollout`'s (infra/config.py)."""
    temperature: float = default(RolloutConfig, "temperature")
    top_p: float = default(RolloutConfig, "top_p")
    max_new_tokens: int = default(RolloutConfig, "max_new_tokens")
    batch_size: int = default(RolloutConfig, "batch_size")
    top_k: int = default(RolloutConfig, "top_k")  # keep only the k most likely tokens before top-p; 0 = off
    vocab_size: int | None = None  # the tokenizer's size: logits beyond it (padded rows) are never sampled


@dataclass
class Sample:
    response_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (eos sampled) or "length"


def pick_tokens(logits: torch.Tensor, seeds: torch.Tensor, step: int | torch.Tensor,
                st: SampleSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """The token each row picks at `step` (argmax at temperature 0, else Gumbel-max with the
    seeded noise) and the log-probs [B, V] of the distribution it was picked from. Shared by
    every backend, so they pick the same tokens from the same logits. Columns at or beyond
    `st.vocab_size` (padded lm_head rows) are cut off first; the noise of a token id does not
    depend on the width, so an unpadded model samples the same tokens either way."""
    logits = real_logits(logits, st.vocab_size)
    if st.temperature == 0.0:
        logp = torch.log_softmax(logits.float(), dim=-1)
        return logp.argmax(-1), logp
    logp = sampling_logprobs(logits, st.temperature, st.top_p, st.top_k)
    u = uniform_noise(seeds, step, logp.shape[-1], logits.device)
    return (logp.double() - torch.log(-torch.log(u))).argmax(-1), logp


@torch.no_grad()
def sample(model, prompts: Sequence[Sequence[int]], seeds: Sequence[int], settings: SampleSettings,
           eos_id: int, pad_id: int, on_batch: Callable[[int], None] | None = None) -> list[Sample]:
    """The transformers backend: batched, left-padded, KV-cached decoding with seeded noise."""
    model.eval()
    dev = next(model.parameters()).device
    out: list[Sample] = []
    for lo in range(0, len(prompts), settings.batch_size):
        out.extend(_sample_batch(model, prompts[lo:lo + settings.batch_size], seeds[lo:lo + settings.batch_size],
                                 settings, eos_id, pad_id, dev))
        if on_batch:
            on_batch(min(lo + settings.batch_size, len(prompts)))
    return out


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, attention mask, position ids) of a left-padded batch of prompts, so that
    every row's next token is generated at the same column."""
    b, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def kv_decode(models: Sequence, prompts, max_new: int, pick: Callable, eos_id: int, pad_id: int):
    """The one decode loop: batched, left-padded, KV-cached decoding of one or more models in
    lockstep (the student alone, or student and teacher when `tasks.patch` substitutes tokens).
    `pick(step, logits, done)` gets each model's last-position logits [B, rows] and the rows
    already finished, and returns the next token per row; finished rows are given `pad_id`.
    Returns (tokens [B, max_new], lengths [B] (up to and including EOS), stopped [B]) on the CPU."""
    b = len(prompts)
    dev = next(models[0].parameters()).device
    ids, mask, pos = (t.to(dev) for t in left_padded(prompts, pad_id))
    res = [m(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True) for m in models]
    next_pos = pos[:, -1:] + 1
    tokens = torch.full((b, max_new), pad_id, dtype=torch.long, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    lengths = torch.full((b,), max_new, dtype=torch.long, device=dev)
    for t in range(max_new):
        tok = pick(t, [r.logits[:, -1] for r in res], done)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        tokens[:, t] = tok
        newly = (~done) & (tok == eos_id)
        lengths = torch.where(newly, torch.full_like(lengths, t + 1), lengths)
        done |= newly
        # one host sync per step: stop early once every sequence has finished
        if bool(done.all()) or t == max_new - 1:
            break
        mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=dev)], dim=1)
        res = [m(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos,
                 past_key_values=r.past_key_values, use_cache=True) for m, r in zip(models, res)]
        next_pos = next_pos + 1
    return tokens.cpu(), lengths.cpu(), done.cpu()


def _sample_batch(model, prompts, seeds, st: SampleSettings, eos_id, pad_id, dev) -> list[Sample]:
    seeds_t = torch.tensor(list(seeds), dtype=torch.int64, device=dev)
    lps = torch.zeros((len(prompts), st.max_new_tokens), dtype=torch.float32, device=dev)

    def pick(t, logits, done):
        tok, logp = pick_tokens(logits[0], seeds_t, t, st)
        lps[:, t] = logp.gather(-1, tok[:, None]).squeeze(-1)
        return tok

    tokens, lengths, done = kv_decode([model], prompts, st.max_new_tokens, pick, eos_id, pad_id)
    lps = lps.cpu()
    return [Sample(tokens[i, :lengths[i]].tolist(), lps[i, :lengths[i]].tolist(),
                   "stop" if done[i] else "length") for i in range(len(prompts))]


# -- teacher-forced forward -----------------------------------------------------------------

def response_logits(model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                    pad_id: int, batch_size: int, grad: bool = False) -> Iterator[tuple[int, torch.Tensor, list[int]]]:
    """Yield (first index, logits [tokens, V], lengths) per batch: for every response token,
    the logits of the position that predicts it. Rows are right-padded; the logits of all
    responses in the batch are concatenated in order."""
    dev = next(model.parameters()).device
    for lo in range(0, len(prompts), batch_size):
        ps, rs = prompts[lo:lo + batch_size], responses[lo:lo + batch_size]
        yield lo, batch_response_logits(model, ps, rs, pad_id, dev, grad), [len(r) for r in rs]


def _response_batch(prompts, responses, pad_id, dev):
    """Right-padded prompt+response ids, their attention mask, and the (row, column) of the
    position that predicts each response token, in response order."""
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    rows, cols = [], []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        rows += [i] * len(r)
        cols += range(len(p) - 1, len(p) - 1 + len(r))
    return ids.to(dev), mask.to(dev), torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)


def batch_response_logits(model, prompts, responses, pad_id, dev, grad: bool = False) -> torch.Tensor:
    ids, mask, rows, cols = _response_batch(prompts, responses, pad_id, dev)
    with torch.set_grad_enabled(grad):
        logits = model(input_ids=ids, attention_mask=mask).logits
        return logits[rows, cols]


class _HeadInput(torch.nn.Module):
    """Stands in for the lm_head during one forward: keeps its input, returns no logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.hidden = x
        return x[..., :0]


def batch_response_hidden(model, prompts, responses, pad_id, dev, grad: bool = False):
    """``(hidden [N, H], lm_head)``: what the lm_head would receive at each response position.

    The model's own forward runs (so FSDP's hooks gather its parameters) with the lm_head
    swapped for a stand-in that records its input, so no ``[batch, length, V]`` logits are
    made; the caller applies the head chunk by chunk (``kernels.fused_linear``). Whether the
    head's output is the model's logits is checked by ``check_head_is_logits``.
    """
    ids, mask, rows, cols = _response_batch(prompts, responses, pad_id, dev)
    head = model.get_output_embeddings()
    stand_in = _HeadInput()
    model.set_output_embeddings(stand_in)
    try:
        with torch.set_grad_enabled(grad):
            model(input_ids=ids, attention_mask=mask)
            return stand_in.hidden[rows, cols], head
    finally:
        model.set_output_embeddings(head)


def head_mismatch(model, seq: Sequence[int], base=None, head=None, transform=None) -> float | None:
    """The one check that a model's logits are ``transform(lm_head(final hidden states))``, which
    every path that applies the head itself relies on (scoring, the rock analysis, the trainer's
    ``train.fused_lm_head``). ``seq`` runs through the model's own forward and through the split
    path: ``base`` (the decoder) then ``head``, or, with no ``base``, the model's forward with the
    head's input captured (so FSDP's hooks run). Returns the largest |difference| when it is over
    the tolerance (1e-4 in float32, 2e-2 in 16-bit dtypes, relative to the logits' scale above 1),
    None when they agree. Some architectures post-process the head's output (soft-capping,
    scaling): training or scoring ``hidden @ W.T`` would then use other logits than the model's."""
    dev = next(model.parameters()).device
    ids = torch.tensor([list(seq)], dtype=torch.long, device=dev)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits.float()
        if base is not None:
            hidden = base(input_ids=ids, attention_mask=mask).last_hidden_state
        else:
            head, stand_in = model.get_output_embeddings(), _HeadInput()
            model.set_output_embeddings(stand_in)
            try:
                model(input_ids=ids, attention_mask=mask)
            finally:
                model.set_output_embeddings(head)
            hidden = stand_in.hidden
        got = head(hidden)
        got = (transform(got) if transform else got).float()
    if got.shape != want.shape:
        return float("nan")
    tol = 1e-4 if next(model.parameters()).dtype == torch.float32 else 2e-2
    err = float((got - want).abs().max())
    return err if err > tol * max(1.0, float(want.abs().max())) else None


def check_head_is_logits(model) -> None:
    """``train.fused_lm_head``'s check (``head_mismatch`` on a probe sequence): fail unless the
    lm_head's output is the model's logits."""
    err = head_mismatch(model, [0, 1, 2, 3, 4, 5, 6])
    if err is not None:
        raise ValueError(
            f"train.fused_lm_head: {type(model).__name__}'s logits are not lm_head(hidden states) "
            f"(max difference {err:.3g}; the model post-processes them, e.g. soft-capping): "
            "set train.fused_lm_head: false")


@dataclass(frozen=True)
class ChatFormat:
    """How a prompt is rendered (`data.chat_template`, `data.system_prompt`,
    `data.chat_template_kwargs`): `template` is the Jinja text, or None for the raw prompt."""
    template: str | None = None
    system_prompt: str | None = None
    kwargs: tuple = ()  # sorted (name, value) pairs, so the dataclass stays hashable

    @classmethod
    def from_config(cls, data, tokenizer) -> "ChatFormat":
        """`auto` is the tokenizer's own template (None when it has none), `none` the raw text,
        anything else a template file."""
        setting = data.chat_template
        if setting == "none":
            template = None
        elif setting == "auto":
            template = getattr(tokenizer, "chat_template", None) or None
        else:
            template = Path(setting).expanduser().read_text()
        return cls(template, data.system_prompt, tuple(sorted((data.chat_template_kwargs or {}).items())))

    def messages(self, text: str) -> list[dict]:
        sys = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return sys + [{"role": "user", "content": text}]

    def render(self, tokenizer, text: str) -> str:
        """The prompt as the model reads it: the template with a generation prompt."""
        return tokenizer.apply_chat_template(self.messages(text), chat_template=self.template, tokenize=False,
                                             add_generation_prompt=True, **dict(self.kwargs))


def encode_prompt(tokenizer, text: str, chat: ChatFormat | None = None) -> list[int]:
    """Prompt token ids. Raw text (no template): with the tokenizer's own special tokens (a BOS
    where the model family uses one). With a chat template: the rendered conversation, encoded
    without adding special tokens when it already starts with the BOS text (the template put
    it there), else with them. That is lm-eval's rule for its contexts (`HFLM.tok_encode`,
    `add_bos_token` unset), so what we train on is what the benchmark measures."""
    if chat is None or chat.template is None:
        return tokenizer(text, add_special_tokens=True)["input_ids"]
    rendered = chat.render(tokenizer, text)
    bos = getattr(tokenizer, "bos_token", None)
    return tokenizer(rendered, add_special_tokens=not (bos and rendered.startswith(bos)))["input_ids"]


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first index where two id lists differ (or where one ends), None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))
