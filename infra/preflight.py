"""Preflight: every check that needs to look at files, run before anything is written.

`preflight(config)` reads the prompt dataset, both tokenizers and both model configs,
and the store's reachability; it raises `ConfigError` naming the field at fault. It is
cheap (no weights are loaded) so `opdflow run` always calls it first.
"""
from __future__ import annotations

from pathlib import Path

from opdflow.infra.config import Config, ConfigError
from opdflow.infra.testbeds.data import load_prompts
from opdflow.infra.models.lm import ChatFormat, context_length, encode_prompt, first_difference, load_tokenizer


def _tokenizer_and_context(config: Config, role: str):
    m = getattr(config, role)
    if m.is_builtin:  # demo or planted: the tokenizer is built, not read
        from opdflow.infra.testbeds.builtin import builtin
        return builtin(m.path).load().build_tokenizer(), getattr(config, m.path).max_position_embeddings
    try:
        tok = load_tokenizer(m.path)
    except Exception as e:  # noqa: BLE001 - whatever transformers raises, the dir is at fault
        raise ConfigError(f"{role}.path", f"cannot load a tokenizer from {m.path!r}: {e}") from None
    return tok, context_length(m.path)


def preflight(config: Config) -> list[dict]:
    """Validate everything the run will read; returns the prompt rows (already loaded)."""
    rows = load_prompts(config)
    if not any(r["split"] == "train" for r in rows):
        raise ConfigError("data.source", "no prompts left for training after the probe and eval splits")
    t_tok, t_ctx = _tokenizer_and_context(config, "teacher")
    s_tok, s_ctx = _tokenizer_and_context(config, "student")
    for role in ("teacher", "student"):
        _check_weights(config, role)
    if t_tok.get_vocab() != s_tok.get_vocab():
        tv, sv = t_tok.get_vocab(), s_tok.get_vocab()
        diff = sum(1 for k in set(tv) | set(sv) if tv.get(k) != sv.get(k))
        raise ConfigError("student.path", f"the student's tokenizer disagrees with the teacher's "
                                          f"({len(sv)} vs {len(tv)} tokens, {diff} differ); "
                                          "OPD needs one shared vocabulary")
    for role, tok in (("teacher", t_tok), ("student", s_tok)):
        n_tok, head_rows = vocab_rows(config, role, tok)  # raises when the lm_head has fewer rows than tokens
        if role == "teacher" and head_rows > n_tok and config.scoring.backend == "vllm":
            from opdflow.infra.sampling.vllm_backend import padded_scoring_problem
            raise ConfigError("scoring.backend", padded_scoring_problem(head_rows, n_tok))
    chat = check_renderings(config, rows, t_tok, s_tok)
    longest = max(len(encode_prompt(s_tok, r["prompt"], chat)) for r in rows) + 1
    ctx = min(c for c in (t_ctx, s_ctx) if c) if (t_ctx or s_ctx) else 0
    need = longest + config.rollout.max_new_tokens
    if ctx and need > ctx:
        raise ConfigError("rollout.max_new_tokens", f"{config.rollout.max_new_tokens} new tokens after the longest "
                                                    f"prompt ({longest} tokens) need {need} positions; the models' "
                                                    f"context is {ctx}")
    if config.train.kernel == "triton":
        import os
        import torch
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError("train.kernel", "'triton' needs a CUDA device (or TRITON_INTERPRET=1); "
                                              "use 'auto' to take Triton where CUDA is available")
    for section in ("rollout", "scoring"):
        if getattr(config, section).backend == "vllm":
            _require_vllm(getattr(config, section).vllm, f"{section}.vllm")
    _check_scale(config)
    _check_eval_tasks(config)
    from opdflow.infra.tracking import MLFLOW_URI_ENV, mlflow_problem
    problem = mlflow_problem()
    if problem:
        raise ConfigError(MLFLOW_URI_ENV, problem)
    return rows


RENDER_CHECK_PROMPTS = 16


def check_renderings(config: Config, rows: list[dict], t_tok, s_tok) -> ChatFormat:
    """The student's and the teacher's renderings of the same conversations must be the same
    ids (the teacher scores the student's prompt ids: a template mismatch biases every score
    silently, e.g. a BOS on one side only). Checked on the first prompts with each tokenizer's
    `data.chat_template` resolution (`auto`: each model's own template); the first differing
    token is named. Returns the student's format (what the prompts stage encodes with)."""
    d = config.data
    s_chat, t_chat = ChatFormat.from_config(d, s_tok), ChatFormat.from_config(d, t_tok)
    if s_chat.template is None and (d.system_prompt or d.chat_template_kwargs):
        field = "data.system_prompt" if d.system_prompt else "data.chat_template_kwargs"
        raise ConfigError(field, f"needs a chat template, but data.chat_template is {d.chat_template!r}"
                                 + (" and the student's tokenizer has none" if d.chat_template == "auto" else ""))
    for r in rows[:RENDER_CHECK_PROMPTS]:
        try:
            a, b = encode_prompt(s_tok, r["prompt"], s_chat), encode_prompt(t_tok, r["prompt"], t_chat)
        except Exception as e:  # noqa: BLE001 - a template that fails to render is a config problem
            raise ConfigError("data.chat_template", f"the chat template does not render prompt "
                                                    f"{r['prompt_id']}: {type(e).__name__}: {e}") from None
        i = first_difference(a, b)
        if i is not None:
            def tok_at(ids, tok):
                return repr(tok.convert_ids_to_tokens(ids[i])) if i < len(ids) else "(end)"
            raise ConfigError("data.chat_template",
                              f"the student's and the teacher's renderings of prompt {r['prompt_id']} differ at "
                              f"token {i}: student {tok_at(a, s_tok)} vs teacher {tok_at(b, t_tok)} "
                              f"({len(a)} vs {len(b)} tokens); give both one template (data.chat_template: PATH)")
    return s_chat


def vocab_rows(config: Config, role: str, tok) -> tuple[int, int]:
    """(tokenizer size, lm_head rows) of a model, from its config (no weights read). More rows
    than tokens is a padded vocabulary (Qwen: 151,665 tokens, 151,936 rows): the extra rows are
    masked everywhere (`infra.models.lm.real_logits`). Fewer rows than tokens cannot work: refused."""
    m = getattr(config, role)
    n_tok = len(tok)
    if m.is_builtin:
        return n_tok, n_tok
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(str(m.path))
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    rows = int(getattr(cfg, "vocab_size", 0) or 0)
    if rows and rows < n_tok:
        raise ConfigError(f"{role}.path", f"{m.path!r}: the tokenizer has {n_tok} tokens but the model's lm_head only "
                                          f"{rows} rows (config.json vocab_size): tokens {rows}..{n_tok - 1} cannot be scored")
    return n_tok, rows or n_tok


def vocab_summary(config: Config) -> list[str]:
    """One line per model for `opdflow validate`: its vocabulary and padded lm_head rows."""
    out = []
    for role in ("teacher", "student"):
        tok, _ = _tokenizer_and_context(config, role)
        n_tok, rows = vocab_rows(config, role, tok)
        pad = f", {rows - n_tok} padded rows beyond the tokenizer masked out" if rows > n_tok else ""
        out.append(f"{role}: vocabulary {n_tok} tokens, lm_head {rows} rows{pad}")
    return out


def _check_eval_tasks(config: Config) -> None:
    """Every `eval.tasks` name resolves in lm-eval (its built-in tasks, `eval.include_path`,
    and the demo's `opdflow_arith`, which the eval stage writes at run time from the template
    under evals/tasks/): an unknown name fails here, in seconds, not at `eval.teacher`."""
    from opdflow.evals.harness import TASK_TEMPLATE, unknown_tasks
    inc = config.eval.include_path
    if inc and not Path(inc).is_dir():
        raise ConfigError("eval.include_path", f"{inc!r} is not a directory")
    includes = [Path(inc)] if inc else []
    if {"opdflow_arith", "opdflow_planted"} & set(config.eval.tasks):  # built-in tasks' templates
        includes.append(TASK_TEMPLATE.parent)
    # opdflow_data is written by the eval stage from the eval split (evals.harness.write_data_task)
    missing = unknown_tasks([t for t in config.eval.tasks if t != "opdflow_data"], includes or None)
    if missing:
        where = f"lm-eval's tasks or {inc!r}" if inc else "lm-eval's tasks (set eval.include_path for your own)"
        said = "; ".join(f"{t!r}" + (f" (did you mean {', '.join(map(repr, m))}?)" if m else "")
                         for t, m in missing.items())
        raise ConfigError("eval.tasks", f"not found in {where}: {said}")


def _check_weights(config: Config, role: str) -> None:
    """A user's model dir: its *.safetensors headers parse and every tensor lies inside its file
    (a truncated download fails here, in seconds, naming the file), and it has weights at all."""
    m = getattr(config, role)
    if m.is_builtin:
        return
    from opdflow.infra.failures import WEIGHTS_HINT, check_weights_dir
    bad = check_weights_dir(m.path)
    if bad:
        f, why = bad[0]
        raise ConfigError(f"{role}.path", f"{f}: {why}; {WEIGHTS_HINT}"
                          + (f" ({len(bad) - 1} more bad files)" if len(bad) > 1 else ""))
    p = Path(m.path)
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise ConfigError(f"{role}.path", f"{m.path!r} has no weights (no *.safetensors or *.bin file)")


def _require_vllm(cfg, field: str) -> None:
    """A vllm backend starts `vllm serve` from vLLM's own environment (`<section>.vllm.python`,
    `make vllm-env`) or a server command: that environment must exist and hold vLLM. Checked from
    the package's metadata, without importing vLLM (slow)."""
    from opdflow.infra.sampling.vllm_backend import VllmUnavailable, check_available
    try:
        check_available(cfg, field)
    except VllmUnavailable as e:
        path, _, msg = str(e).partition(": ")
        raise ConfigError(path, f"{msg}; or use another backend (transformers, native, or openai against a "
                                f"running server)") from None


def _check_scale(config: Config) -> None:
    """Execution settings this machine cannot honour: a missing task runner, more training
    processes than GPUs (on CPU, gloo runs any number of processes)."""
    import importlib.util

    import torch
    if config.scale.task_runner == "dask" and importlib.util.find_spec("prefect_dask") is None:
        raise ConfigError("scale.task_runner", "'dask' needs prefect-dask: pip install 'opdflow[dask]'")
    gpus = torch.cuda.device_count()
    if gpus and config.train.nproc_per_node > gpus:
        raise ConfigError("train.nproc_per_node", f"{config.train.nproc_per_node} training processes, one per GPU, "
                                                  f"but this machine has {gpus} GPUs")
