"""The generators of `python -m prada_fast.rationales`: the prompts (`Prompter`: the
question asking for reasoning, then the reasoning asking for the answer), transformers'
`generate` and vLLM's offline engine behind one call signature."""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import torch

from prada_fast.data.format import ANSWER_MARKER, PROMPT
from prada_fast.models import META_FILE, PRESETS, load_causal_lm

COT_TRIGGER = "Let's think step by step."
PROMPTS = ("auto", "cot", "prada")
FIT_FILE = "prada_teacher_fit.json"  # written by teacher.fit_teacher into a fitted teacher


class RationaleError(ValueError):
    """Bad input to the command: one line, exit code 2."""


@dataclasses.dataclass(frozen=True)
class Prompter:
    """Stage 1 (the question, asking for reasoning) and stage 2 (the reasoning so far,
    asking for the answer) as text."""
    kind: str                      # "cot" | "prada" | "template"
    template: str | None = None    # --prompt-template's text, with {question}
    chat: object = None            # a tokenizer whose chat template wraps the question

    def first(self, question: str) -> str:
        if self.kind == "prada":
            return PROMPT.format(question=question)
        if self.kind == "template":
            return self.template.replace("{question}", question)
        if self.chat is not None:
            head = self.chat.apply_chat_template([{"role": "user", "content": question}],
                                                 tokenize=False, add_generation_prompt=True)
            return f"{head}{COT_TRIGGER}"
        return f"Q: {question}\nA: {COT_TRIGGER}"

    def second(self, question: str, rationale: str) -> str:
        return f"{self.first(question)} {rationale} {ANSWER_MARKER.strip()}"


def make_prompter(kind: str, template_file: str | None, teacher: str, tokenizer) -> Prompter:
    if template_file:
        path = Path(template_file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise RationaleError(f"--prompt-template {path}: cannot read it ({e})") from None
        if "{question}" not in text:
            raise RationaleError(f"--prompt-template {path}: no {{question}} placeholder")
        return Prompter("template", template=text.rstrip("\n"))
    if kind == "auto":  # a model prada_fast fitted or trained knows its own format
        fitted = teacher in PRESETS or any((Path(teacher) / f).is_file() for f in (FIT_FILE, META_FILE))
        kind = "prada" if fitted else "cot"
    chat = tokenizer if kind == "cot" and getattr(tokenizer, "chat_template", None) else None
    return Prompter(kind, chat=chat)


def split_sample(text: str) -> tuple[str, bool]:
    """(the rationale of a generated text, whether it states an answer): the text before
    its last "The answer is" (the extractor's marker) within the first answer."""
    text = text.split("\nQ:", 1)[0]
    start = text.rfind(ANSWER_MARKER)
    if start < 0:
        return text.strip(), False
    return text[:start].strip(), True


class HFGenerator:
    """transformers' `generate`: left-padded batches, the KV cache, sampling seeded per call."""

    def __init__(self, model, tokenizer, device):
        self.model, self.tok, self.device = model.to(device).eval(), tokenizer, device
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        ids = self.tok(text, add_special_tokens=False).input_ids
        bos = self.tok.bos_token_id
        return [bos, *ids] if bos is not None and (not ids or ids[0] != bos) else ids

    @torch.no_grad()
    def __call__(self, prompts: list[str], n: int, *, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int) -> list[list[tuple[str, int]]]:
        """Per prompt, n (text, generated tokens) pairs; temperature 0: greedy."""
        seqs = [self.encode(p) for p in prompts]
        T = max(map(len, seqs))
        ids = torch.full((len(seqs), T), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):  # left padding: every prompt ends at column T
            ids[i, T - len(s):] = torch.tensor(s)
            mask[i, T - len(s):] = 1
        sample = temperature > 0
        kwargs = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if sample \
            else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = self.model.generate(ids.repeat_interleave(n, 0).to(self.device),
                                      attention_mask=mask.repeat_interleave(n, 0).to(self.device),
                                      max_new_tokens=max_new_tokens,
                                      pad_token_id=self.pad, eos_token_id=self.tok.eos_token_id,
                                      use_cache=True, **kwargs)
        new = out[:, T:].cpu()
        results = []
        for row in new.tolist():
            eos = self.tok.eos_token_id
            n_tok = row.index(eos) + 1 if eos in row else len(row)
            results.append((self.tok.decode(row[:n_tok], skip_special_tokens=True), n_tok))
        return [results[i * n:(i + 1) * n] for i in range(len(prompts))]


class VLLMGenerator:
    """vLLM's offline engine (optional: installed, a GPU, a model directory)."""

    def __init__(self, path: str, seed: int):
        from vllm import LLM
        self.llm = LLM(model=path, seed=seed)

    def __call__(self, prompts, n, *, temperature, top_p, max_new_tokens, seed):
        from vllm import SamplingParams
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                                max_tokens=max_new_tokens, seed=seed)
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [[(c.text, len(c.token_ids)) for c in o.outputs] for o in outs]


def use_vllm(engine: str, teacher: str) -> bool:
    available = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
    if engine == "vllm" and not available:
        raise RationaleError("--engine vllm: needs the vllm package and a GPU")
    if engine == "vllm" and teacher in PRESETS:
        raise RationaleError("--engine vllm: needs a teacher directory, not a preset")
    return engine == "vllm" or (engine == "auto" and available and teacher not in PRESETS)


def gen_tokenizer(gen):
    return getattr(gen, "tok", None) or gen.llm.get_tokenizer()


def build_generator(args, device):
    if use_vllm(args.engine, args.teacher):
        return VLLMGenerator(args.teacher, args.seed)
    model, tok = load_causal_lm(args.teacher, attn="sdpa")
    return HFGenerator(model, tok, device)
