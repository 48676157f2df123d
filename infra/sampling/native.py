"""The `native` rollout sampler: a static KV cache, continuous batching, and on CUDA a decode
step captured once as a CUDA graph.

Why: the transformers backend (`infra.models.lm.sample`) grows a dynamic KV cache and launches every
kernel of every decode step from Python. A small model on a GPU then spends most of a step
waiting for the host, and a batch runs as long as its longest sequence. Here the cache, the
inputs and the outputs of a decode step live at fixed addresses, so one step (model forward,
seeded token pick, bookkeeping) is recorded once with `torch.cuda.CUDAGraph` and replayed with a
single launch; and a slot whose sequence ends is refilled with the next waiting prompt, so the
batch stays full.

Semantics are those of `infra.models.lm.sample`, token for token: the pick is the shared
`lm.pick_tokens` (greedy at temperature 0, else Gumbel-max over `uniform_noise(seed, t, ...)`
after temperature, top-k, top-p), and every slot keeps its own step counter, so token t of a
sequence gets the noise of (its seed, t) whatever slot, batch or refill it ran in. The logprob
reported for a token is under the distribution it was picked from.

How the cache works (transformers 5.x `StaticCache` writes every row at one shared, growing
index, which cannot hold slots at different lengths):

- `SlotCache` is a `StaticCache` whose layers (`_SlotLayer`) are [max_batch, kv_heads, max_len,
  head_dim] buffers written at a per-slot index. Decode writes the new key/value of slot b at
  `write_idx[b]` (a scatter: no host value involved, so it can be captured) and returns the
  whole buffer; prefill writes a group of prompts into their slots at [0, width) and returns
  the group's own keys, so a prompt attends only to itself.
- A slot's sequence starts at cache index `start[b]`; a token at position p sits at index
  `start + p`. Prefill left-pads a group of prompts to the longest (so the last prompt token of
  every row is the last column and only that column's logits are computed), which puts a
  shorter prompt at `start = width - len`. A refill of one prompt has `start = 0`.
- Positions are per slot (`position_ids = p`, RoPE sees 0..len-1 for every prompt, as in
  `infra.models.lm.sample`), and the attention mask is built per slot as a 4-D mask that transformers
  passes through unchanged: query of slot b at index i sees keys in [start[b], i]. Pad rows of
  a prefill see themselves only (never an empty row, so no NaN reaches the cache). Every
  index a sequence reads was written by that same sequence first, so stale keys from an earlier
  occupant of the slot are never seen.
- Capacity: every prompt needs `len(prompt) + max_new_tokens <= max_len`.

What runs where: on CPU everything runs eagerly; that covers the cache layout, masks, per-slot
positions and steps, refills, weight updates, and the very function that is captured on CUDA
(`_decode`), which is written without host syncs or shape changes. Only the capture and replay
themselves (`torch.cuda.CUDAGraph`, one graph per (temperature, top-p, top-k, eos) in its own
memory pool, after warm-up steps on a side stream) run on CUDA alone; tests/test_native.py
checks replay == eager there. Prefills (the first fill and every refill, batched over the
slots freed by one step) always run eagerly, so on CUDA a step that frees slots also pays one
eager forward over the refilled prompts. Slots with nothing left to do keep computing (the
graph's shape is fixed) and their outputs are ignored.

Weights: a captured graph reads the parameters at their addresses, so new weights must be
copied into the same tensors: `update_weights` does that (never `model.to(...)` or
`load_state_dict(assign=True)` on a model with a live sampler). The capture is paid once per
process and settings; `get_sampler` keeps one sampler per (model, max_batch, max_len).

Attention: 4-D masks need the `sdpa` (boolean mask) or `eager` (additive mask) implementation;
sliding-window and hybrid caches are refused.
"""
from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from opdflow.infra.models.lm import Sample, SampleSettings, offline, pick_tokens

_ATTENTION = ("sdpa", "eager")


# -- the cache ------------------------------------------------------------------------------

class _SlotLayer(StaticLayer):
    """One layer's keys/values for `max_batch` slots, written at per-slot indices."""

    def __init__(self, cache: "SlotCache", max_cache_len: int):
        super().__init__(max_cache_len=max_cache_len)
        self._cache = cache

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads = self._cache.max_batch, key_states.shape[1]
        self.k_head_dim, self.v_head_dim = key_states.shape[-1], value_states.shape[-1]
        shape = (self.batch_size, self.num_heads, self.max_cache_len)
        self.keys = torch.zeros(shape + (self.k_head_dim,), dtype=self.dtype, device=self.device)
        self.values = torch.zeros(shape + (self.v_head_dim,), dtype=self.dtype, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        slots = self._cache.prefill_slots
        if slots is not None:  # prefill: rows go to their slots at [0, width); attend to themselves
            width = key_states.shape[2]
            self.keys[:, :, :width].index_copy_(0, slots, key_states)
            self.values[:, :, :width].index_copy_(0, slots, value_states)
            return key_states, value_states
        self.keys.scatter_(2, _column_index(self._cache.write_idx, key_states), key_states)
        self.values.scatter_(2, _column_index(self._cache.write_idx, value_states), value_states)
        return self.keys, self.values


def _column_index(write_idx: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    b, h, _, d = states.shape
    return write_idx.view(b, 1, 1, 1).expand(b, h, 1, d)


class SlotCache(StaticCache):
    """A `StaticCache` of (max_batch, max_len) whose slots are written at their own indices
    (`write_idx`, [max_batch]) in decode, or as a group (`prefill_slots`) in prefill."""

    def __init__(self, config, max_batch: int, max_len: int):
        super().__init__(config=config, max_cache_len=max_len)
        if any(type(layer) is not StaticLayer for layer in self.layers):
            raise NotImplementedError("the native sampler supports full-attention layers only "
                                      f"(got {sorted({type(x).__name__ for x in self.layers})})")
        self.max_batch = max_batch
        self.write_idx: torch.Tensor | None = None
        self.prefill_slots: torch.Tensor | None = None
        self.layers = [_SlotLayer(self, max_len) for _ in self.layers]


# -- the sampler ----------------------------------------------------------------------------

class NativeSampler:
    """Static-cache, continuously batched sampler for one model (see the module docstring)."""

    def __init__(self, model, max_batch: int, max_len: int, use_graph: bool | None = None):
        if max_batch < 1 or max_len < 2:
            raise ValueError(f"need max_batch >= 1 and max_len >= 2, got {max_batch}, {max_len}")
        self.attention = model.config._attn_implementation
        if self.attention not in _ATTENTION:
            raise NotImplementedError(f"attention implementation {self.attention!r}: the native "
                                      f"sampler passes 4-D masks, which needs one of {_ATTENTION}")
        self.model, self.max_batch, self.max_len = model.eval(), max_batch, max_len
        self.device = next(model.parameters()).device
        self.use_graph = self.device.type == "cuda" if use_graph is None else use_graph
        self.capture_seconds: dict[tuple, float] = {}
        self._checked: set[tuple] = set()  # settings whose captured step was checked against eager
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._state = _new_state(max_batch, max_len, self.device)
        self._kv_index = torch.arange(max_len, device=self.device)
        self._cache = SlotCache(model.config, max_batch, max_len)
        self._cache.write_idx = self._state["write_idx"]
        self._allocate_cache()

    # -- public ---------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int], settings: SampleSettings,
               eos_id: int, pad_id: int, on_batch: Callable[[int], None] | None = None) -> list[Sample]:
        """`infra.models.lm.sample`'s contract. `settings.batch_size` only sets how often `on_batch`
        is called (with the number of finished sequences); the batch is `max_batch` slots."""
        self._check(prompts, seeds, settings)
        if settings.max_new_tokens <= 0 or not prompts:
            return [Sample([], [], "length") for _ in prompts]
        self.model.eval()
        step = self._step_function(settings, eos_id)
        run = _Run(prompts, seeds, eos_id, self.max_batch, settings.batch_size, on_batch)
        self._admit(run, list(range(self.max_batch)), settings, eos_id, pad_id)
        step = self._warmup_check(step, settings, eos_id, run)
        while run.active():
            step()
            finished = self._state["finished"].tolist()  # the one host sync per step
            for b in run.active():
                run.n_tokens[b] += 1
            done = [b for b in run.active() if finished[b]]
            if done:
                self._retire(run, done)
                self._admit(run, done, settings, eos_id, pad_id)
        return run.results

    @torch.no_grad()
    def update_weights(self, source) -> None:
        """Copy new weights (a state dict, a model, or a saved model dir) into the existing
        parameter tensors, so a captured graph stays valid."""
        state = _state_dict_of(source, self.model)
        params = dict(self.model.named_parameters())
        missing = sorted(name for name in params if name not in state)
        if missing:
            raise KeyError(f"update_weights: no value for parameters {missing[:5]}"
                           f"{' ...' if len(missing) > 5 else ''}")
        for name, param in params.items():
            _copy_into(param, state[name], name)
        for name, buf in self.model.named_buffers():
            if name in state:
                _copy_into(buf, state[name], name)

    # -- prefill --------------------------------------------------------------------------

    def _admit(self, run: "_Run", free: list[int], st: SampleSettings, eos_id: int, pad_id: int) -> None:
        """Fill free slots from the waiting queue; sequences that end on their first token
        are retired at once and their slots refilled."""
        while free and run.waiting:
            slots = free[:len(run.waiting)]
            reqs = [run.waiting.popleft() for _ in slots]
            finished = self._prefill(slots, [run.prompts[r] for r in reqs], [run.seeds[r] for r in reqs],
                                     st, eos_id, pad_id)
            for b, r in zip(slots, reqs):
                run.slot_req[b], run.n_tokens[b] = r, 1
            free = [b for b, f in zip(slots, finished) if f]
            if free:
                self._retire(run, free)

    def _prefill(self, slots, prompts, seeds, st: SampleSettings, eos_id: int, pad_id: int) -> list[bool]:
        """One forward over a left-padded group of prompts into `slots`; picks token 0 and
        sets the slots' decode state. Returns which sequences already finished."""
        dev, s = self.device, self._state
        lens = torch.tensor([len(p) for p in prompts], device=dev)
        width = int(lens.max())
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        start = width - lens
        slots_t = torch.tensor(slots, device=dev)
        logits = self._prefill_logits(slots_t, ids.to(dev), start)
        seeds_t = torch.tensor(list(seeds), dtype=torch.int64, device=dev)
        tok, logp = pick_tokens(logits, seeds_t, 0, st)
        s["start"][slots_t], s["pos"][slots_t], s["step"][slots_t] = start, lens, 1
        s["tok_in"][slots_t], s["seeds"][slots_t], s["budget"][slots_t] = tok, seeds_t, st.max_new_tokens
        s["out_tok"][slots_t, 0] = tok
        s["out_lp"][slots_t, 0] = logp.gather(-1, tok[:, None]).squeeze(-1)
        return ((tok == eos_id) | (st.max_new_tokens <= 1)).tolist()

    def _prefill_logits(self, slots: torch.Tensor, ids: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        width = ids.shape[1]
        ar = torch.arange(width, device=ids.device)
        causal = ar[None, :] <= ar[:, None]
        own = (ar[None, None, :] >= start[:, None, None]) | torch.eye(width, dtype=torch.bool, device=ids.device)
        positions = (ar[None, :] - start[:, None]).clamp(min=0)
        self._cache.prefill_slots = slots
        try:
            return self._forward(ids, positions, (causal[None] & own)[:, None])
        finally:
            self._cache.prefill_slots = None

    def _allocate_cache(self) -> None:
        """Run a one-token prefill into slot 0 so every layer allocates its buffers now (a
        captured graph must find them in place)."""
        with torch.no_grad():
            ids = torch.zeros((1, 1), dtype=torch.long, device=self.device)
            self._prefill_logits(torch.zeros(1, dtype=torch.long, device=self.device), ids,
                                 torch.zeros(1, dtype=torch.long, device=self.device))

    # -- decode ---------------------------------------------------------------------------

    def _decode(self, st: SampleSettings, eos_id: int) -> None:
        """One decode step for every slot, on static buffers only: this is what is captured."""
        s, last = self._state, self.max_len - 1
        torch.clamp(s["start"] + s["pos"], max=last, out=s["write_idx"])
        allowed = (self._kv_index[None, :] >= s["start"][:, None]) & (self._kv_index[None, :] <= s["write_idx"][:, None])
        logits = self._forward(s["tok_in"][:, None], s["pos"].clamp(max=last)[:, None], allowed[:, None, None, :])
        tok, logp = pick_tokens(logits, s["seeds"], s["step"], st)
        col = s["step"].clamp(max=last)[:, None]
        s["out_tok"].scatter_(1, col, tok[:, None])
        s["out_lp"].scatter_(1, col, logp.gather(-1, tok[:, None]))
        s["finished"].copy_((tok == eos_id) | (s["step"] + 1 >= s["budget"]))
        s["tok_in"].copy_(tok)
        s["pos"].add_(1)
        s["step"].add_(1)

    def _step_function(self, st: SampleSettings, eos_id: int) -> Callable[[], None]:
        if not self.use_graph:
            return lambda: self._decode(st, eos_id)
        key = (st.temperature, st.top_p, st.top_k, st.vocab_size, eos_id)  # vocab_size: padded rows cut (lm.pick_tokens)
        if key not in self._graphs:
            self._graphs[key] = self._capture(st, eos_id, key)
        return self._graphs[key].replay

    def _capture(self, st: SampleSettings, eos_id: int, key: tuple) -> torch.cuda.CUDAGraph:
        """Warm up on a side stream, capture one `_decode`, then put the state back (warm-up
        steps wrote only to slots that are not in use: a call runs to completion)."""
        t0 = time.perf_counter()
        saved = {name: t.clone() for name, t in self._state.items()}
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._decode(st, eos_id)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._decode(st, eos_id)
        for name, t in saved.items():
            self._state[name].copy_(t)
        torch.cuda.synchronize(self.device)
        self.capture_seconds[key] = time.perf_counter() - t0
        return graph

    def _warmup_check(self, step: Callable[[], None], st: SampleSettings, eos_id: int, run: "_Run"
                      ) -> Callable[[], None]:
        """On the first batch after a capture: one replay of the captured step against one eager
        `_decode` from the same state (tokens and logprobs of the active slots). If they differ,
        the sampler falls back to eager decoding with a warning naming the difference. The state
        is put back after each, so the batch then runs as if unchecked."""
        key = (st.temperature, st.top_p, st.top_k, getattr(st, "vocab_size", None), eos_id)
        if not self.use_graph or key in self._checked or not run.active():
            if not self.use_graph:
                _WARMUP.clear()  # the last check only, not keys left by an earlier one
                _WARMUP.update(checked=False, mode="eager", reason=f"no CUDA graph on {self.device.type}")
            return step
        slots = torch.tensor(run.active(), device=self.device)

        def one(fn) -> tuple[torch.Tensor, torch.Tensor]:
            saved = {name: t.clone() for name, t in self._state.items()}
            fn()
            col = self._state["step"][slots].sub(1).clamp(min=0, max=self.max_len - 1)[:, None]
            out = (self._state["tok_in"][slots].clone(), self._state["out_lp"][slots].gather(1, col)[:, 0].clone())
            for name, t in saved.items():
                self._state[name].copy_(t)
            return out

        captured, eager = one(step), one(lambda: self._decode(st, eos_id))
        self._checked.add(key)
        diff = compare_steps(*captured, *eager)
        _WARMUP.clear()
        _WARMUP.update(checked=True, mode="graph" if diff is None else "eager", difference=diff)
        if diff is None:
            return step
        import warnings
        warnings.warn(f"native sampler: the captured CUDA-graph decode step disagrees with an eager step on the "
                      f"first batch ({diff}); falling back to eager decoding", RuntimeWarning, stacklevel=3)
        self.use_graph = False
        self._graphs.clear()
        return lambda: self._decode(st, eos_id)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] of the last column, with a 4-D mask (True = may attend)."""
        mask = allowed
        if self.attention == "eager":
            dtype = self.model.dtype
            mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min)
        out = self.model(input_ids=ids, position_ids=positions, attention_mask=mask,
                         past_key_values=self._cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    # -- bookkeeping ----------------------------------------------------------------------

    def _retire(self, run: "_Run", slots: list[int]) -> None:
        rows = torch.tensor(slots, device=self.device)
        width = max(run.n_tokens[b] for b in slots)
        toks = self._state["out_tok"][rows, :width].cpu()
        lps = self._state["out_lp"][rows, :width].cpu()
        for i, b in enumerate(slots):
            n = run.n_tokens[b]
            ids = toks[i, :n].tolist()
            run.finish(b, Sample(ids, lps[i, :n].tolist(), "stop" if ids[-1] == run.eos_id else "length"))

    def _check(self, prompts, seeds, st: SampleSettings) -> None:
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        for p in prompts:
            if not p:
                raise ValueError("empty prompt")
            if len(p) + st.max_new_tokens > self.max_len:
                raise ValueError(f"prompt of {len(p)} tokens + max_new_tokens {st.max_new_tokens} exceeds "
                                 f"the sampler's max_len {self.max_len}")


def _new_state(max_batch: int, max_len: int, dev: torch.device) -> dict[str, torch.Tensor]:
    """The decode step's static buffers, one row per slot."""
    def z(*shape, dtype=torch.long):
        return torch.zeros(shape, dtype=dtype, device=dev)
    return {
        "tok_in": z(max_batch),       # token fed to the next step
        "pos": z(max_batch),          # its position in its sequence
        "start": z(max_batch),        # cache index of the sequence's position 0
        "step": z(max_batch),         # index t of the token the next step picks
        "seeds": z(max_batch),
        "budget": z(max_batch),       # max_new_tokens
        "write_idx": z(max_batch),    # start + pos: where this step's key/value goes
        "finished": z(max_batch, dtype=torch.bool),
        "out_tok": z(max_batch, max_len),
        "out_lp": z(max_batch, max_len, dtype=torch.float32),
    }


class _Run:
    """Host-side bookkeeping of one `sample` call: queue, slot owners, results, progress."""

    def __init__(self, prompts, seeds, eos_id: int, max_batch: int, report_every: int, on_batch):
        self.prompts, self.seeds, self.eos_id = prompts, seeds, eos_id
        self.waiting = deque(range(len(prompts)))
        self.slot_req = [-1] * max_batch  # request index in each slot, -1 = free
        self.n_tokens = [0] * max_batch   # tokens picked so far by each slot's sequence
        self.results: list[Sample | None] = [None] * len(prompts)
        self.n_done, self._on_batch = 0, on_batch
        self._report_every = self._next_report = max(1, report_every)

    def active(self) -> list[int]:
        return [b for b, r in enumerate(self.slot_req) if r >= 0]

    def finish(self, slot: int, result: Sample) -> None:
        self.results[self.slot_req[slot]] = result
        self.slot_req[slot] = -1
        self.n_done += 1
        if self._on_batch and (self.n_done >= self._next_report or self.n_done == len(self.results)):
            self._on_batch(self.n_done)
            self._next_report = (self.n_done // self._report_every + 1) * self._report_every


def _copy_into(target: torch.Tensor, value: torch.Tensor, name: str) -> None:
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"update_weights: {name} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
    target.copy_(value)


def _state_dict_of(source, model) -> Mapping[str, torch.Tensor]:
    if isinstance(source, Mapping):
        return source
    if isinstance(source, torch.nn.Module):
        return source.state_dict()
    if isinstance(source, (str, Path)):
        offline()
        from transformers import AutoModelForCausalLM

        from opdflow.infra.models.lm import MODEL_LOAD_LOCK
        with MODEL_LOAD_LOCK:  # one from_pretrained at a time per process (infra/models/lm.py)
            return AutoModelForCausalLM.from_pretrained(str(source), dtype=model.dtype).state_dict()
    raise TypeError(f"update_weights takes a state dict, a model or a model dir, not {type(source).__name__}")


# -- one sampler per model and shape -----------------------------------------------------------

_SAMPLERS: dict[tuple[int, int, int], NativeSampler] = {}


WARMUP_LOGPROB_ATOL = 1e-3
_WARMUP: dict = {}


def compare_steps(graph_tokens: torch.Tensor, graph_logprobs: torch.Tensor, eager_tokens: torch.Tensor,
                  eager_logprobs: torch.Tensor, atol: float = WARMUP_LOGPROB_ATOL) -> str | None:
    """None when a captured step's tokens equal the eager step's and their logprobs agree to
    `atol`; otherwise what differs (how many slots, the first one, the largest logprob gap)."""
    gt, et = graph_tokens.cpu().long(), eager_tokens.cpu().long()
    gl, el = graph_logprobs.cpu().double(), eager_logprobs.cpu().double()
    if gt.shape != et.shape or gl.shape != el.shape:
        return f"shapes differ: tokens {tuple(gt.shape)} vs {tuple(et.shape)}"
    parts = []
    bad = (gt != et).nonzero().flatten().tolist()
    if bad:
        b = bad[0]
        parts.append(f"tokens differ in {len(bad)} of {gt.numel()} slots (first: slot {b}, graph {int(gt[b])} vs "
                     f"eager {int(et[b])})")
    gap = (gl - el).abs()
    gap = torch.where(torch.isnan(gap), torch.full_like(gap, float("inf")), gap)  # a NaN is a difference
    if gap.numel() and float(gap.max()) > atol:
        parts.append(f"logprobs differ by up to {float(gap.max()):.3g} (tolerance {atol:g})")
    return "; ".join(parts) or None


def last_warmup_check() -> dict:
    """What the last warm-up check found in this process ({} if none ran)."""
    return dict(_WARMUP)


def get_sampler(model, max_batch: int, max_len: int) -> NativeSampler:
    """The process's sampler for (model, max_batch, max_len), built on first use."""
    key = (id(model), max_batch, max_len)
    sampler = _SAMPLERS.get(key)
    if sampler is None or sampler.model is not model:  # an id can be reused by a new model
        sampler = _SAMPLERS[key] = NativeSampler(model, max_batch, max_len)
    return sampler


def clear_samplers() -> None:
    """Drop every cached sampler (their caches and graphs)."""
    _SAMPLERS.clear()


def sample(model, prompts: Sequence[Sequence[int]], seeds: Sequence[int], settings: SampleSettings,
           eos_id: int, pad_id: int, on_batch: Callable[[int], None] | None = None) -> list[Sample]:
    """Drop-in for `infra.models.lm.sample`: `settings.batch_size` slots, a cache length rounded up
    to a power of two (at least 64) so that calls share a sampler."""
    need = max((len(p) for p in prompts), default=1) + settings.max_new_tokens
    max_len = max(64, 1 << (need - 1).bit_length())
    return get_sampler(model, settings.batch_size, max_len).sample(prompts, seeds, settings, eos_id, pad_id, on_batch)
