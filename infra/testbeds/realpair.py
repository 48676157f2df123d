"""A locally built model pair shaped like real checkpoints, for tests and for trying opdflow.

Why: the demo's models have a 59-token word-level tokenizer, no chat template and an lm_head
exactly as wide as the tokenizer; real pairs (Qwen3-8B teaching Qwen3-1.7B) have a BPE
tokenizer with special tokens and a chat template, and an lm_head padded beyond the tokenizer
(151,665 tokens, 151,936 rows). Code that works on the demo can crash or silently mis-train on
those (issue 16). This module builds, with no hub and in seconds on a CPU:

- a byte-level BPE tokenizer trained with `tokenizers` on generated text (a few thousand
  tokens), with ChatML special tokens (``<|endoftext|>`` as pad, ``<|im_start|>``,
  ``<|im_end|>`` as EOS) and a ChatML Jinja chat template that honours ``enable_thinking``;
- a teacher (Llama architecture) and a student (Qwen2 architecture) sharing it, tiny hidden
  sizes, random weights, and lm_heads of ``rows`` rows (default 151,936) so logits have the
  real width; with ``hot_padding`` the padded rows are scaled up so that an unmasked sampler,
  top-k or loss would pick them (a test that padded ids never appear can then fail);
- ``prompts.jsonl``, prompts with answers (``question``/``answer`` fields) for `data.source`.

The weights are untrained: the pair exercises formats and shapes, not distillation quality.

Run: ``python -m opdflow.infra.testbeds.realpair OUT_DIR`` (prints the dirs), or `build_pair(out_dir)`.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

QWEN_ROWS = 151_936
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
_NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def _words(rng: random.Random, n: int) -> list[str]:
    syl = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "ve", "zu", "qa", "fe", "do", "gi", "hu", "ya"]
    return ["".join(rng.choice(syl) for _ in range(rng.randint(2, 4))) for _ in range(n)]


def make_examples(n: int, seed: int = 0) -> list[dict]:
    """Addition questions with their answers, e.g. 'What is three plus 4?' -> '7'."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 10), rng.randint(0, 10)
        name = lambda x: _NUMBERS[x] if rng.random() < 0.5 else str(x)  # noqa: E731
        out.append({"question": f"What is {name(a)} plus {name(b)}? Think, then give the number.",
                    "answer": str(a + b)})
    return out


def corpus(seed: int = 0, lines: int = 4000) -> list[str]:
    """Generated text for the tokenizer: the task's questions and answers plus pseudo-words."""
    rng = random.Random(seed)
    vocab = _words(rng, 1500)
    text = []
    for ex in make_examples(lines // 2, seed):
        text.append(f"{ex['question']} The answer is {ex['answer']}.")
    for _ in range(lines // 2):
        text.append(" ".join(rng.choice(vocab) for _ in range(rng.randint(5, 15))))
    return text


def build_tokenizer(vocab_size: int = 3000, seed: int = 0):
    """A byte-level BPE `PreTrainedTokenizerFast` with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML
    return fast


def _model(arch: str, n_tok: int, rows: int, tok, seed: int, hot_padding: bool):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=rows, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=False,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = (LlamaForCausalLM(LlamaConfig(**common)) if arch == "llama"
             else Qwen2ForCausalLM(Qwen2Config(**common)))
    if hot_padding and rows > n_tok:
        with torch.no_grad():  # padded rows that would win every argmax, top-k and sample if not masked
            w = model.lm_head.weight
            w[n_tok:] = w[torch.arange(n_tok, rows) % n_tok] * 40.0
    return model.eval()


def _pin_tokenizer_class(model_dir: Path) -> None:
    """Both dirs name one tokenizer class. transformers 5 saves a trained tokenizer as the
    generic `TokenizersBackend`, and AutoTokenizer then loads the Qwen2 dir as `Qwen2Tokenizer`
    (whose digit-splitting pre-tokenizer encodes "7" differently) but the Llama dir as the
    generic class: the same files, two tokenizations. opdflow's preflight catches exactly that
    (the renderings differ); a real pair shares its tokenizer class, so pin it here."""
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg_path.write_text(json.dumps(cfg, indent=2))


def build_pair(out_dir: str | Path, rows: int = QWEN_ROWS, vocab_size: int = 3000, n_prompts: int = 64,
               seed: int = 0, hot_padding: bool = True) -> dict[str, Path]:
    """Write `teacher/` (Llama), `student/` (Qwen2), their shared tokenizer and
    `prompts.jsonl` under `out_dir`; returns the paths. The lm_heads have `rows` rows."""
    out = Path(out_dir)
    tok = build_tokenizer(vocab_size, seed)
    n_tok = len(tok)
    if rows < n_tok:
        raise ValueError(f"rows ({rows}) must be at least the tokenizer's size ({n_tok})")
    paths = {}
    for role, arch, s in (("teacher", "llama", seed), ("student", "qwen2", seed + 1)):
        d = out / role
        d.mkdir(parents=True, exist_ok=True)
        _model(arch, n_tok, rows, tok, s, hot_padding).save_pretrained(str(d), safe_serialization=True)
        tok.save_pretrained(str(d))
        _pin_tokenizer_class(d)
        paths[role] = d
    data = out / "prompts.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in make_examples(n_prompts, seed + 7)))
    paths["data"] = data
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m opdflow.infra.testbeds.realpair OUT_DIR")
    for name, path in build_pair(sys.argv[1]).items():
        print(f"{name}: {path}")
