"""The teacher's own chain of thought: several sampled rationales per training question,
kept only where they reach the gold answer (Fine-tune-CoT's "diverse reasoning").

    python -m prada_fast.rationales --teacher DIR|PRESET --data SPEC --out FILE.jsonl
    torchrun --nproc_per_node N -m prada_fast.rationales ...     (questions split over ranks)

Per question: K samples (`--samples`, `--sample-temperature` / top-p sampling, batched `generate`
with left padding and the KV cache); the answer of each is read with the evaluation's own
checker (`data.format.grade`: the text after "The answer is"); a sample that states no
answer gets a second, greedy step that asks for it (Kojima et al.'s answer extraction). A
sample is kept when its answer matches the gold one, and once per distinct rationale.

Prompts (`--prompt`): `cot`, zero-shot chain of thought, "Q: {question}\\nA: Let's think
step by step." (inside the tokenizer's chat template when it has one); `prada`, the
trainer's own format "Q: {question}\\nA:", which a teacher fitted by prada_fast was taught;
`auto` (the default) takes `prada` for a preset or a teacher fitted by prada_fast, else
`cot`. `--prompt-template FILE` replaces the first step's prompt: a text with `{question}`.

Crash-safe: each rank appends one line per finished question to OUT.partial/rankR.jsonl
(flushed and synced); a rerun with the same flags skips the finished questions, and
sampling is seeded per batch of questions, so the result is that of an uninterrupted run,
and the same under any number of ranks. Rank 0 merges the parts into OUT (written to a
temporary file, then renamed) and OUT's `.summary.json`, then removes OUT.partial.
"""
from .command import build_parser, generate_all, main, parse_args, validate
from .generators import (
    COT_TRIGGER,
    FIT_FILE,
    PROMPTS,
    HFGenerator,
    Prompter,
    RationaleError,
    VLLMGenerator,
    make_prompter,
    split_sample,
    use_vllm,
)
from .partial import merge, read_partial, settings_of, summarise, summary_path, teacher_identity
from .questions import Question, judge, load_questions, make_batches, run_batch

__all__ = ["COT_TRIGGER", "FIT_FILE", "PROMPTS", "HFGenerator", "Prompter", "Question", "RationaleError",
           "VLLMGenerator", "build_parser", "generate_all", "judge", "load_questions", "main",
           "make_batches", "make_prompter", "merge", "parse_args", "read_partial", "run_batch",
           "settings_of", "split_sample", "summarise", "summary_path", "teacher_identity", "use_vllm",
           "validate"]
