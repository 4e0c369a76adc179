"""The data pipeline: loaders, the synthetic generator, formatting and the domain split."""
from .format import (
    PROMPT,
    Collator,
    answer_correct,
    completion_text,
    encode,
    extract_answer,
    prompt_text,
)
from .loaders import load_aqua, load_gsm8k, load_hf, load_jsonl, load_strategyqa
from .spec import check_spec, load_spec
from .records import DataError, Record
from .split import domains_of, split_domains
from .synthetic import DOMAINS, SYNTHETIC_TARGET, generate, generate_all

__all__ = [
    "DOMAINS",
    "PROMPT",
    "Collator",
    "DataError",
    "Record",
    "SYNTHETIC_TARGET",
    "answer_correct",
    "check_spec",
    "completion_text",
    "domains_of",
    "encode",
    "extract_answer",
    "generate",
    "generate_all",
    "load_aqua",
    "load_gsm8k",
    "load_hf",
    "load_jsonl",
    "load_spec",
    "load_strategyqa",
    "prompt_text",
    "split_domains",
]
