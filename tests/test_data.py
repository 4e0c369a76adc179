"""Tests of the data pipeline: loaders, the spec grammar, formatting and the domain split."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import ByT5Tokenizer

from prada_fast.data import (
    Collator,
    DataError,
    Record,
    answer_correct,
    completion_text,
    domains_of,
    encode,
    extract_answer,
    generate_all,
    load_aqua,
    load_gsm8k,
    load_hf,
    load_jsonl,
    load_spec,
    load_strategyqa,
    prompt_text,
    split_domains,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def data_dir() -> Path:
    if not (DATA / "gsm8k_train.jsonl").is_file():
        pytest.skip(f"real data not found at {DATA} (../shared/data from the repo root)")
    return DATA


@pytest.fixture(scope="module")
def tok() -> ByT5Tokenizer:
    return ByT5Tokenizer(extra_ids=0)  # byte-level: pad 0, eos 1, byte b -> b + 3


def write_lines(path: Path, rows: list) -> Path:
    """Rows as JSON lines; a str row is written verbatim (for malformed lines)."""
    text = "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows)
    path.write_text(text + "\n", encoding="utf-8")
    return path


GOOD_GSM8K = {"question": "Tom has 2 apples and buys 3. How many?",
              "answer": "He has 2+3 = <<2+3=5>>5 apples.\n#### 5"}


# ---------------------------------------------------------------- the real files


def test_gsm8k_real(data_dir: Path) -> None:
    train, skipped = load_gsm8k(data_dir / "gsm8k_train.jsonl")
    test, _ = load_gsm8k(data_dir / "gsm8k_test.jsonl")
    assert (len(train), len(test), skipped) == (7473, 1319, 0)
    first = train[0]
    assert first.question.startswith("Natalia sold clips to 48 of her friends")
    assert first.answer == "72"
    assert first.rationale is not None and "<<" not in first.rationale
    assert "48+24 = 72" in first.rationale and "####" not in first.rationale
    assert (first.domain, first.origin) == ("gsm8k", "gsm8k_train.jsonl:1")
    for record in train + test:
        float(record.answer)  # every final answer is a plain number once commas go


def test_aqua_real(data_dir: Path) -> None:
    dev, _ = load_aqua(data_dir / "aqua_dev.json")
    test, _ = load_aqua(data_dir / "aqua_test.json")
    assert (len(dev), len(test)) == (254, 254)
    first = dev[0]
    assert first.question.startswith("Three birds are flying")
    assert first.question.endswith("Options: A)32400 B)6000 C)600 D)60000 E)10")
    assert first.answer == "A"
    assert {r.answer for r in dev + test} <= set("ABCDE")


def test_strategyqa_real(data_dir: Path) -> None:
    records, _ = load_strategyqa(data_dir / "strategyqa_train.json")
    assert len(records) == 2061
    first = records[0]
    assert first.question == "Are more people today related to Genghis Khan than Julius Caesar?"
    assert first.answer == "yes"
    assert first.rationale.startswith("Julius Caesar had three children. Genghis Khan")
    assert first.origin == "strategyqa_train.json[0]"
    assert {r.answer for r in records} == {"yes", "no"}


def test_spec_real_paths(data_dir: Path) -> None:
    records, _ = load_spec(f"{data_dir}/gsm8k_train.jsonl#300")
    assert len(records) == 300 and records[0].answer == "72"
    records, _ = load_spec(f"aqua:{data_dir}/aqua_test.json?domain=algebra#10")
    assert len(records) == 10 and {r.domain for r in records} == {"algebra"}
    records, _ = load_spec(f"{data_dir}/strategyqa_train.json")
    assert len(records) == 2061 and records[0].domain == "strategyqa"


# ---------------------------------------------------------------- bad inputs


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "gsm8k_bad.jsonl", [GOOD_GSM8K, GOOD_GSM8K, '{"question": '])
    with pytest.raises(DataError, match=r"gsm8k_bad\.jsonl:3: invalid JSON"):
        load_gsm8k(path)


def test_blank_lines_are_not_records(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "g.jsonl", [GOOD_GSM8K, "", "   ", GOOD_GSM8K])
    records, skipped = load_gsm8k(path)
    assert (len(records), skipped) == (2, 0)
    assert records[1].origin == "g.jsonl:4"


@pytest.mark.parametrize(
    ("row", "pattern"),
    [
        ({"question": "Q?"}, r'g\.jsonl:2: field "answer": missing'),
        ({"question": 7, "answer": "#### 1"}, r'g\.jsonl:2: field "question": expected str'),
        ({"question": "  ", "answer": "#### 1"}, r'field "question": empty question'),
        ({"question": "Q?", "answer": "it is 4"}, r'field "answer": missing "#### "'),
        ({"question": "Q?", "answer": ["#### 4"]}, r'field "answer": expected str, got list'),
        (["not", "an", "object"], r"g\.jsonl:2: expected a JSON object"),
    ],
)
def test_gsm8k_bad_records(tmp_path: Path, row: object, pattern: str) -> None:
    path = write_lines(tmp_path / "g.jsonl", [GOOD_GSM8K, row])
    with pytest.raises(DataError, match=pattern):
        load_gsm8k(path)


def test_gsm8k_number_commas(tmp_path: Path) -> None:
    row = {"question": "Big?", "answer": "Lots.\n#### 1,200,000"}
    records, _ = load_gsm8k(write_lines(tmp_path / "g.jsonl", [row]))
    assert records[0].answer == "1200000"


def test_skip_bad_counts(tmp_path: Path) -> None:
    rows = [GOOD_GSM8K, "{oops", {"question": "Q?"}, GOOD_GSM8K, {"question": 1, "answer": "x"}]
    path = write_lines(tmp_path / "g.jsonl", rows)
    records, skipped = load_gsm8k(path, skip_bad=True)
    assert (len(records), skipped) == (2, 3)
    assert [r.origin for r in records] == ["g.jsonl:1", "g.jsonl:4"]
    records, skipped = load_spec(f"gsm8k:{path}", skip_bad=True)
    assert (len(records), skipped) == (2, 3)
    with pytest.raises(DataError, match=r"g\.jsonl:2"):
        load_gsm8k(path)


def test_aqua_bad_records(tmp_path: Path) -> None:
    good = {"question": "1+1?", "options": ["A)1", "B)2"], "rationale": "1+1=2", "correct": "B"}
    bad_letter = {**good, "correct": "E"}
    bad_options = {**good, "options": "A)1 B)2"}
    path = write_lines(tmp_path / "aqua_x.json", [good, bad_letter, bad_options])
    with pytest.raises(DataError, match=r'aqua_x\.json:2: field "correct"'):
        load_aqua(path)
    records, skipped = load_aqua(path, skip_bad=True)
    assert (len(records), skipped) == (1, 2)
    assert records[0].question == "1+1? Options: A)1 B)2" and records[0].answer == "B"


def test_strategyqa_bad_records(tmp_path: Path) -> None:
    good = {"question": "Is ice cold?", "answer": True, "facts": ["Ice is frozen water."]}
    path = tmp_path / "strategyqa_x.json"
    path.write_text(json.dumps([good, {**good, "answer": "yes"}, {**good, "facts": "x"}]))
    with pytest.raises(DataError, match=r'strategyqa_x\.json\[1\]: field "answer": expected bool'):
        load_strategyqa(path)
    records, skipped = load_strategyqa(path, skip_bad=True)
    assert (len(records), skipped) == (1, 2)
    assert (records[0].rationale, records[0].answer) == ("Ice is frozen water.", "yes")

    path.write_text('[\n  {"question": "a",\n  oops\n]')
    with pytest.raises(DataError, match=r"strategyqa_x\.json:3: invalid JSON"):
        load_strategyqa(path)
    path.write_text(json.dumps(good))
    with pytest.raises(DataError, match="expected one JSON array"):
        load_strategyqa(path)


def test_load_jsonl_mapping(tmp_path: Path) -> None:
    rows = [{"q": "2+2?", "r": "2+2=4.", "a": 4, "d": "math"},
            {"q": "Sky blue?", "a": True, "d": "facts"}]
    path = write_lines(tmp_path / "mixed.jsonl", rows)
    fields = {"question": "q", "answer": "a", "domain": "d"}
    records, _ = load_jsonl(path, fields, None)
    assert [(r.answer, r.domain, r.rationale) for r in records] == [
        ("4", "math", None), ("yes", "facts", None)]
    records, _ = load_jsonl(path, {"question": "q", "answer": "a"}, "fixed")
    assert {r.domain for r in records} == {"fixed"}
    # an explicitly mapped column is required
    with pytest.raises(DataError, match=r'mixed\.jsonl:2: field "r": missing'):
        load_jsonl(path, {"question": "q", "rationale": "r", "answer": "a"}, "x")
    with pytest.raises(DataError, match="no domain"):
        load_jsonl(path, {"question": "q"}, None)


def test_load_hf_local_files(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "tbl.jsonl", [{"question": "Q1?", "answer": "1"},
                                                  {"question": "Q2?", "answer": "2"}])
    records, skipped = load_hf(path, {}, "tbl")
    assert [(r.question, r.answer, r.domain) for r in records] == [
        ("Q1?", "1", "tbl"), ("Q2?", "2", "tbl")]
    assert skipped == 0 and records[0].origin == "tbl.jsonl:train[0]"
    csv = tmp_path / "t.csv"
    csv.write_text("prompt,gold,task\nWhat?,7,alpha\n")
    records, _ = load_spec(f"hf:{csv}?question=prompt&answer=gold&domain_field=task&split=test")
    assert [(r.question, r.answer, r.domain) for r in records] == [("What?", "7", "alpha")]
    odd = tmp_path / "t.txt"
    odd.write_text("x")
    with pytest.raises(DataError, match=r"t\.txt.*cannot read '\.txt'"):
        load_hf(odd, {}, "x")


# ---------------------------------------------------------------- the spec grammar


def test_spec_synthetic() -> None:
    records, skipped = load_spec("synthetic")
    assert (len(records), skipped) == (1600, 0)
    records, _ = load_spec("synthetic:10")
    assert len(records) == 40 and domains_of(records) == [
        "arithmetic", "coinflip", "lastletter", "sorting"]
    records, _ = load_spec("synthetic:5:coinflip,sorting")
    assert len(records) == 10 and domains_of(records) == ["coinflip", "sorting"]
    assert load_spec("synthetic:5", seed=3)[0] == generate_all(5, 3)
    assert load_spec("synthetic:5", seed=3)[0] != load_spec("synthetic:5", seed=4)[0]
    assert len(load_spec("synthetic:10#7")[0]) == 7
    with pytest.raises(DataError, match="unknown synthetic domain.*chess"):
        load_spec("synthetic:5:chess")
    with pytest.raises(DataError, match="positive integer"):
        load_spec("synthetic:0")


def test_spec_files(tmp_path: Path) -> None:
    named = write_lines(tmp_path / "gsm8k_small.jsonl", [GOOD_GSM8K] * 5)
    records, _ = load_spec(f"{named}#3")
    assert len(records) == 3 and records[0].answer == "5" and records[0].domain == "gsm8k"
    anon = write_lines(tmp_path / "data.jsonl", [GOOD_GSM8K] * 2)
    assert len(load_spec(f"gsm8k:{anon}?domain=math")[0]) == 2
    assert load_spec(f"gsm8k:{anon}?domain=math")[0][0].domain == "math"
    with pytest.raises(DataError, match=r"data\.jsonl.*cannot tell the format.*FORMAT:PATH"):
        load_spec(str(anon))
    records, _ = load_spec(f"jsonl:{anon}?answer=answer")
    assert records[0].domain == "data" and records[0].answer.endswith("#### 5")


def test_spec_jsonl_options(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "x.jsonl", [{"q": "A?", "r": "because", "a": "b", "d": "dd"}])
    records, _ = load_spec(f"jsonl:{path}?question=q&rationale=r&answer=a&domain=math")
    assert records[0] == Record("A?", "because", "b", "math", origin="x.jsonl:1")
    records, _ = load_spec(f"jsonl:{path}?question=q&answer=a&domain_field=d")
    assert records[0].domain == "dd"
    with pytest.raises(DataError, match="unknown option 'colour'"):
        load_spec(f"jsonl:{path}?question=q&colour=red")
    with pytest.raises(DataError, match="not both"):
        load_spec(f"jsonl:{path}?question=q&domain=a&domain_field=d")
    with pytest.raises(DataError, match="not key=value"):
        load_spec(f"jsonl:{path}?question")


def test_spec_errors_name_the_spec(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"'csv:/x\.csv': unknown format 'csv'"):
        load_spec("csv:/x.csv")
    missing = tmp_path / "gsm8k_none.jsonl"
    with pytest.raises(DataError, match=r"gsm8k_none\.jsonl.*no such file"):
        load_spec(str(missing))
    with pytest.raises(DataError, match=r"'aqua:/nowhere/a\.json': no such file"):
        load_spec("aqua:/nowhere/a.json")
    with pytest.raises(DataError, match="at least one"):
        load_spec("synthetic#0")


# ---------------------------------------------------------------- formatting


def test_prompt_and_completion_text() -> None:
    record = Record("3+5-2=?", "3+5=8. 8-2=6.", "6", "arithmetic")
    assert prompt_text(record) == "Q: 3+5-2=?\nA:"
    assert completion_text(record) == " 3+5=8. 8-2=6. The answer is 6."
    bare = Record("Q?", None, "no", "d")
    assert completion_text(bare) == " The answer is no."


def test_encode_masks_prompt(tok: ByT5Tokenizer) -> None:
    record = Record("Sort 7 2 5.", "min 2, then 5, then 7.", "2 5 7", "sorting")
    ex = encode(record, tok, max_len=256, domain_id=3)
    prompt = tok(prompt_text(record), add_special_tokens=False)["input_ids"]
    assert ex["domain"] == 3 and ex["truncated"] is False
    assert ex["input_ids"][: len(prompt)] == prompt
    assert ex["labels"][: len(prompt)] == [-100] * len(prompt)
    kept = [(i, lab) for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100]
    assert all(i == lab for i, lab in kept)
    assert len(kept) == len(ex["input_ids"]) - len(prompt)
    assert kept[-1][1] == tok.eos_token_id
    assert tok.decode([lab for _, lab in kept[:-1]]) == completion_text(record)


def test_encode_unlabelled(tok: ByT5Tokenizer) -> None:
    record = Record("Sort 7 2 5.", "min 2, then 5, then 7.", "2 5 7", "sorting", labelled=False)
    ex = encode(record, tok, max_len=256, domain_id=1)
    assert tok.decode(ex["input_ids"]) == prompt_text(record)
    assert ex["labels"] == [-100] * len(ex["input_ids"])
    no_answer = Record("Q?", None, None, "t", labelled=False)
    assert encode(no_answer, tok, 64, 0)["labels"] == [-100] * len("Q: Q?\nA:")


def test_encode_truncation(tok: ByT5Tokenizer) -> None:
    record = Record("3+5-2=?", "3+5=8. 8-2=6.", "6", "arithmetic", origin="synthetic:a:7")
    full = encode(record, tok, max_len=1000, domain_id=0)
    cut = encode(record, tok, max_len=20, domain_id=0)
    assert cut["truncated"] is True and len(cut["input_ids"]) == 20
    assert cut["input_ids"] == full["input_ids"][:20] and cut["labels"] == full["labels"][:20]
    exact = encode(record, tok, max_len=len(full["input_ids"]), domain_id=0)
    assert exact["truncated"] is False
    with pytest.raises(DataError, match=r"synthetic:a:7: .*max_len=20"):
        encode(record, tok, max_len=20, domain_id=0, truncate=False)
    with pytest.raises(DataError, match='field "answer"'):
        encode(Record("Q?", None, None, "d", origin="o"), tok, 64, 0)


def test_collator(tok: ByT5Tokenizer) -> None:
    records = [Record("1+1?", "1+1=2.", "2", "a"), Record("Long question here?", None, "x", "b"),
               Record("Hm?", None, None, "c", labelled=False)]
    examples = [encode(r, tok, 128, i) for i, r in enumerate(records)]
    batch = Collator(pad_id=tok.pad_token_id)(examples)
    width = max(len(e["input_ids"]) for e in examples)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "domain_labels"}
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].shape == (3, width) and batch[key].dtype == torch.int64
    assert batch["domain_labels"].tolist() == [0, 1, 2]
    assert batch["domain_labels"].dtype == torch.int64
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == ex["input_ids"]
        assert batch["labels"][row, :n].tolist() == ex["labels"]
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert (batch["input_ids"][row, n:] == tok.pad_token_id).all()
        assert (batch["labels"][row, n:] == -100).all()
    with pytest.raises(ValueError):
        Collator(0)([])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A: 3+5=8. 8-2=6. The answer is 6.", "6"),
        (" The answer is 3.5.", "3.5"),
        ("The answer is 2 5 7.\nQ: Sort 1 2 3.", "2 5 7"),
        ("The answer is yes. The answer is no.", "no"),
        ("so C. The answer is C\nQ: next. A: The answer is D.", "C"),
        ("The answer is tg", "tg"),
        ("The answer is $1,000.", "$1,000"),
        ("The answer is .", None),
        ("no marker here", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("pred", "gold", "ok"),
    [
        ("6", "6", True), ("6.0", "6", True), ("1,000", "1000", True), ("$18", "18", True),
        ("-3", "-3.0", True), ("7", "6", False), ("Yes", "yes", True), ("true", "yes", True),
        ("False", "no", True), ("yes", "no", False), ("a", "A", True), ("(B)", "B", True),
        (" TG ", "tg", True), ("gt", "tg", False), (None, "6", False), ("2 5 7", "2 5 7", True),
    ],
)
def test_answer_correct(pred: str | None, gold: str, ok: bool) -> None:
    assert answer_correct(pred, gold) is ok


@pytest.mark.parametrize(("pred", "gold", "ok"), [
    # an instruct model's wording of the gold answer (SmolLM2-135M-Instruct's, docs/results.md)
    ("D) 74325", "D", True), ("C) 8(√3 – 2) is the correct answer", "C", True), ("D)", "D", True),
    ("(c) 600", "C", True), ("D) 52", "C", False), ("not A) 1,1", "A", False),
    ("E is right", "E", False),
    ("no, shrimp scampi", "no", True), ("yes, Christmas trees are indeed different", "yes", True),
    ("No, because I'm not on a diet", "no", True), ("yes, Disneyland Paris is", "no", False),
    ("yes or no", "yes", False), ("not possible", "no", False), ("indeed yes", "yes", False),
    ("48 eggs", "48", True), ("9 hours", "9", True), ("$5 dollars", "5", True),
    ("80 minutes", "160", False), ("1560 * 3 = 4200 cups", "4200", False),
    ("10 + 15 = 25 years", "25", False), ("12 apples and 3 pears", "12", False),
    ("2 5 7 then", "2 5 7", False), ("tg is it", "tg", False),
])
def test_answer_correct_instruct_wording(pred: str, gold: str, ok: bool) -> None:
    assert answer_correct(pred, gold) is ok


def test_round_trip_synthetic() -> None:
    for record in generate_all(25, seed=1):
        assert answer_correct(extract_answer(completion_text(record)), record.answer)


# ---------------------------------------------------------------- the domain split


def _mixed() -> list[Record]:
    return [Record(f"q{i}", "r", "a", dom, origin=f"f:{i}")
            for i, dom in enumerate(["a", "b", "c", "a", "b", "c"])]


def test_split_roles() -> None:
    records = _mixed()
    out = split_domains(records, ["a"], ["c"])
    assert [(r.domain, r.labelled) for r in out] == [
        ("a", True), ("c", False), ("a", True), ("c", False)]
    assert out[1].answer == "a"  # targets keep their gold answer
    assert all(r.labelled for r in records)  # the input is not modified
    out = split_domains(records, None, ["b"])
    assert [(r.domain, r.labelled) for r in out] == [
        ("a", True), ("b", False), ("c", True), ("a", True), ("b", False), ("c", True)]
    assert all(r.labelled for r in split_domains(records, None, None))
    assert domains_of(records) == ["a", "b", "c"]


def test_split_errors() -> None:
    records = _mixed()
    with pytest.raises(DataError, match="'z' is not in the data; present: a, b, c"):
        split_domains(records, ["a"], ["z"])
    with pytest.raises(DataError, match="'y' is not in the data"):
        split_domains(records, ["y"], None)
    with pytest.raises(DataError, match="no records left"):
        split_domains(records, [], None)
    with pytest.raises(DataError, match="both source and target"):
        split_domains(records, ["a", "b"], ["b"])
    unanswered = [*records, Record("q", None, None, "a", origin="u.jsonl:9")]
    with pytest.raises(DataError, match=r'u\.jsonl:9: field "answer"'):
        split_domains(unanswered, ["a"], None)
    assert len(split_domains(unanswered, ["b"], ["a"])) == 5


def _questions(recs: list[Record]) -> list[int]:
    """Reference: each record's question, the connected components of 'same domain and the
    same whitespace-normalised text or the same question_id' (breadth-first search)."""
    comp = [-1] * len(recs)
    same = [[j for j, s in enumerate(recs) if j != i and s.domain == r.domain and (
        s.question.split() == r.question.split() or (r.question_id and s.question_id == r.question_id))]
        for i, r in enumerate(recs)]
    for i in range(len(recs)):
        if comp[i] < 0:
            comp[i], todo = i, [i]
            while todo:
                for j in same[todo.pop()]:
                    if comp[j] < 0:
                        comp[j] = i
                        todo.append(j)
    return comp


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_held_out_questions_are_never_training_records(seed: int) -> None:
    """A question drawn several times (the same text, spacing aside, or the same question_id
    under another text) is held out whole: its copies leave training. Fresh random data."""
    import random

    from prada_fast.data.prepare import hold_out
    rng = random.Random(seed)
    recs = []
    for i in range(rng.randrange(90, 140)):
        dom, q = rng.choice("xyz"), rng.randrange(23)  # ~23 questions a domain, with repeats
        text = rng.choice([f"what is {q}?", f" what  is {q}? ", f"reworded {q} #{rng.randrange(3)}"])
        qid = f"{dom}:{q}" if rng.random() < 0.4 else None
        recs.append(Record(text, "r", "a", dom, question_id=qid, origin=f"f:{i}"))
    comp = _questions(recs)
    of = {id(r): c for r, c in zip(recs, comp)}
    per_domain = 7
    train, held = hold_out(recs, per_domain, seed)
    for dom in "xyz":
        n_questions = len({c for r, c in zip(recs, comp) if r.domain == dom})
        assert n_questions > 2 * per_domain and sum(r.domain == dom for r in held) == per_domain
    held_q = [of[id(r)] for r in held]
    assert len(held_q) == len(set(held_q))  # once each
    assert not set(held_q) & {of[id(r)] for r in train}  # no held-out question in training
    assert sorted(map(id, train)) == sorted(id(r) for r, c in zip(recs, comp) if c not in held_q)


# ---------------------------------------------------------------- questions without rationales


def test_template_joins_columns_of_a_json_array(tmp_path: Path) -> None:
    """SVAMP: one JSON array, the question = Body + Question, a numeric Answer, no rationale."""
    path = tmp_path / "SVAMP.json"
    path.write_text(json.dumps([
        {"Body": "Dan had 5 pens.", "Question": "He gave away 2. How many now?", "Answer": 3.0},
        {"Body": "A box holds 1,200 pins.", "Question": "How many in 2 boxes?", "Answer": "2,400"},
    ]))
    records, _ = load_spec(f"jsonl:{path}?question={{Body}} {{Question}}&answer=Answer&domain=svamp")
    assert [(r.question, r.rationale, r.answer, r.domain, r.origin) for r in records] == [
        ("Dan had 5 pens. He gave away 2. How many now?", None, "3", "svamp", "SVAMP.json[0]"),
        ("A box holds 1,200 pins. How many in 2 boxes?", None, "2400", "svamp", "SVAMP.json[1]")]


def test_template_errors_name_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "svamp.jsonl"
    path.write_text('{"Body": "x", "Question": "y", "Answer": 1}\n{"Body": "x", "Answer": 1}\n')
    with pytest.raises(DataError, match=r'^svamp\.jsonl:2: field "Question": missing$'):
        load_spec(f"jsonl:{path}?question={{Body}} {{Question}}&answer=Answer&domain=s")
    path.write_text('{"Body": "x", "Question": ["y"], "Answer": 1}\n')
    with pytest.raises(DataError, match=r'svamp\.jsonl:1: field "Question": expected str or int'):
        load_spec(f"jsonl:{path}?question={{Body}} {{Question}}&answer=Answer&domain=s")
    with pytest.raises(DataError, match=r"a template names columns in braces"):
        load_spec(f"jsonl:{path}?question={{Body}} {{Question&answer=Answer&domain=s")
    path.write_text('{"q": "x", "a": ""}\n')
    with pytest.raises(DataError, match=r'svamp\.jsonl:1: field "a": empty answer'):
        load_spec(f"jsonl:{path}?question=q&answer=a&domain=s")


@pytest.mark.parametrize(("spelled", "plain"), [
    ("1,234", "1234"), ("$5", "5"), ("5.0", "5"), ("5.50", "5.5"), ("-3", "-3"), ("-$3", "-3"),
    ("50%", "50"), ("1/2", "1/2"), (" 3 / 4 ", "3/4"), ("7.", "7"), (12, "12"), (2.5, "2.5"),
    ("B", "B"), ("yes", "yes"), ("1/0", "1/0"), ("12 apples", "12 apples"),
])
def test_numeric_answers_in_usual_spellings(tmp_path: Path, spelled, plain) -> None:
    path = tmp_path / "n.jsonl"
    path.write_text(json.dumps({"q": "how many?", "a": spelled}) + "\n")
    [record], _ = load_spec(f"jsonl:{path}?question=q&answer=a&domain=n")
    assert record.answer == plain
    if plain not in ("B", "yes", "1/0", "12 apples"):
        assert answer_correct(str(spelled), plain) and answer_correct(plain, str(spelled))


@pytest.mark.parametrize(("pred", "gold", "ok"), [
    ("1/2", "0.5", True), ("0.5", "1/2", True), ("3/4", "0.7", False), ("$1,234.00", "1234", True),
    ("-$3", "-3", True), ("1/0", "1/0", True), ("1/0", "0", False),
])
def test_answer_correct_fractions(pred: str, gold: str, ok: bool) -> None:
    assert answer_correct(pred, gold) is ok


def test_rationales_file_is_read_by_name_or_content(tmp_path: Path) -> None:
    rows = [{"question": "2+2?", "rationale": "2+2=4.", "answer": "4", "domain": "math",
             "sample": k, "teacher": "t", "origin": "x:1"} for k in range(2)]
    rows.append({**rows[0], "question": "3+3?", "rationale": "6.", "answer": "6"})
    path = tmp_path / "teacher_cot.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for spec in (str(path), f"rationales:{path}"):
        records, _ = load_spec(spec)
        assert [(r.question, r.rationale, r.answer, r.domain) for r in records] == [
            ("2+2?", "2+2=4.", "4", "math"), ("2+2?", "2+2=4.", "4", "math"),
            ("3+3?", "6.", "6", "math")]
        assert [r.question_id for r in records] == ["math:2+2?", "math:2+2?", "math:3+3?"]
    path.write_text(path.read_text() + '{"question": "q", "answer": "1", "domain": "m", '
                    '"teacher": "t"}\n')
    with pytest.raises(DataError, match=r'teacher_cot\.jsonl:4: field "rationale": missing'):
        load_spec(str(path))
    with pytest.raises(DataError, match="this format takes no options"):
        load_spec(f"rationales:{path}?domain=x")
    other = tmp_path / "other.jsonl"
    other.write_text('{"question": "q", "answer": "1"}\n')
    with pytest.raises(DataError, match="cannot tell the format"):
        load_spec(str(other))
