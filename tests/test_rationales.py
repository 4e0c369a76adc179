"""python -m prada_fast.rationales: sampled teacher rationales, kept when their answer is the
gold one; resumable after a kill, the same under two ranks; and training on the result (a
question's rationales count once in the domain loss)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from prada_fast import rationales
from prada_fast.data import Collator, Record, encode, generate_all, load_spec
from prada_fast.data.prepare import hold_out
from prada_fast.common.distributed import free_port, torch_threads
from runner import REPO

# The command's sampling settings shared by the runs compared below.
SAMPLING = ["--samples", "3", "--temperature", "1.0", "--top-p", "0.9", "--max-new-tokens", "64",
            "--seed", "5", "--no-progress"]


@pytest.fixture(scope="session")
def teacher(tmp_path_factory):
    """The tiny-teacher preset fitted on the synthetic coinflip sources as the trainer fits
    it (teacher.fit_teacher), briefly: it learns coinflip, not sorting. Cached under this
    session's tmp directory, or under $PRADA_FAST_TEST_TEACHERS across sessions."""
    from prada_fast.models import byte_tokenizer
    from prada_fast.teacher.fit import fit_teacher
    tok = byte_tokenizer()
    examples = []
    for r in generate_all(100, 0, ("coinflip",)):
        ex = encode(r, tok, 96, 0)
        ex["n_labels"] = sum(x != -100 for x in ex["labels"][1:])
        examples.append(ex)
    with torch.random.fork_rng(), torch_threads(1):  # one thread: a shared, loaded CPU
        return fit_teacher("tiny-teacher", tok, examples, Collator(tok.pad_token_id), steps=60,
                           lr=3e-3, batch=16, seed=0, show_progress=False, log=lambda _: None,
                           cache_dir=os.environ.get("PRADA_FAST_TEST_TEACHERS")
                           or tmp_path_factory.mktemp("teachers"))


def env() -> dict:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO)}


def command(teacher, out, *extra, nproc=1) -> list[str]:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                     "--master_port", str(free_port())]
    return [*launcher, "-m", "prada_fast.rationales", "--teacher", str(teacher), "--out", str(out),
            *extra]


def run(cmd, timeout=600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------ end to end
def test_learnt_domain_gives_kept_rationales_that_data_reads(teacher, tmp_path):
    out = tmp_path / "cot.jsonl"
    code = rationales.main(["--teacher", str(teacher), "--data", "synthetic:12:coinflip,sorting",
                            "--out", str(out), "--batch-size", "12", *SAMPLING])
    assert code == 0
    summary = json.loads((tmp_path / "cot.summary.json").read_text())
    coin, sort = summary["domains"]["coinflip"], summary["domains"]["sorting"]
    gold = {r.question: r.answer for r in generate_all(12, 5, ("coinflip",))}  # --seed 5
    # coinflip repeats its questions; the teacher learnt it, not sorting
    assert coin["questions"] == len(gold) == 6 and sort["questions"] == 12
    assert coin["fraction_with_kept"] >= 0.7, summary
    assert 1 <= coin["kept_per_question"] <= 3
    assert sort["kept"] == 0 and sum(sort["dropped"].values()) == 36
    assert coin["tokens"] > 0 and coin["tokens_per_s"] > 0
    records = lines(out)
    assert len(records) == summary["records"] == coin["kept"]
    seen = set()
    for r in records:
        assert r["domain"] == "coinflip" and r["answer"] == gold[r["question"]]
        assert r["teacher"].startswith(str(teacher)) and 0 <= r["sample"] < 3
        assert r["rationale"] and "The answer is" not in r["rationale"]
        assert (r["question"], r["rationale"]) not in seen  # duplicates dropped
        seen.add((r["question"], r["rationale"]))
    # the trainer's --data reads the file as it is: the rationales of a question share an id
    loaded, _ = load_spec(str(out))
    assert [(r.question, r.rationale, r.answer, r.domain) for r in loaded] == \
        [(r["question"], r["rationale"], r["answer"], r["domain"]) for r in records]
    assert len({r.question_id for r in loaded}) == coin["with_kept"]
    assert not (tmp_path / "cot.jsonl.partial").exists()


def test_wrong_answers_are_filtered(teacher, tmp_path):
    """The fitted teacher made wrong (every gold answer of its learnt domain inverted), and
    an untrained teacher: nothing is kept, and the summary says why."""
    gold = generate_all(12, 0, ("coinflip",))  # 7 distinct questions
    data = tmp_path / "inverted.jsonl"
    data.write_text("".join(json.dumps({"question": r.question, "answer": "no" if r.answer == "yes"
                                        else "yes"}) + "\n" for r in gold))
    out = tmp_path / "wrong.jsonl"
    assert rationales.main(["--teacher", str(teacher), "--data", f"jsonl:{data}?domain=coinflip",
                            "--out", str(out), *SAMPLING, "--temperature", "0"]) == 0
    coin = json.loads((tmp_path / "wrong.summary.json").read_text())["domains"]["coinflip"]
    assert out.read_text() == "" and coin["kept"] == 0
    # greedy: 7 questions x 3 samples, every one answered, wrongly
    assert coin["dropped"] == {"wrong": 21}, coin
    out = tmp_path / "random.jsonl"
    assert rationales.main(["--teacher", "tiny-teacher", "--data", "synthetic:4:coinflip",
                            "--out", str(out), *SAMPLING, "--max-new-tokens", "8"]) == 0
    assert out.read_text() == ""


@pytest.fixture(scope="module")
def reference(teacher, tmp_path_factory):
    """An uninterrupted one-rank run over 13 distinct questions, one per batch."""
    out = tmp_path_factory.mktemp("reference") / "ref.jsonl"
    run(command(teacher, out, "--data", "synthetic:8:coinflip,sorting", "--batch-size", "3",
                *SAMPLING))
    return out


def test_resume_after_kill_gives_the_uninterrupted_file(teacher, reference, tmp_path):
    out = tmp_path / "killed.jsonl"
    cmd = command(teacher, out, "--data", "synthetic:8:coinflip,sorting", "--batch-size", "3",
                  *SAMPLING)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    part = tmp_path / "killed.jsonl.partial" / "rank0.jsonl"
    deadline = time.time() + 300
    while not (part.is_file() and part.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = part.read_text().count("\n")
    assert not out.exists() and done < 13  # 13 distinct questions (coinflip repeats)
    with part.open("a") as fh:
        fh.write('{"index": 12, "domain": "sort')  # a line torn by the crash
    resumed = run(cmd)
    assert f"{done} questions already done" in resumed.stdout
    assert out.read_bytes() == reference.read_bytes()
    assert (tmp_path / "killed.summary.json").is_file()


def test_two_ranks_give_the_one_rank_records(teacher, reference, tmp_path):
    out = tmp_path / "two.jsonl"
    run(command(teacher, out, "--data", "synthetic:8:coinflip,sorting", "--batch-size", "3",
                *SAMPLING, nproc=2))
    assert out.read_bytes() == reference.read_bytes()
    assert len(lines(out)) > 0


# ------------------------------------------------------------------ pieces
def test_split_and_judge():
    assert rationales.split_sample(" a. b. The answer is 6.\nQ: next") == ("a. b.", True)
    assert rationales.split_sample(" just thinking\nQ: x The answer is 3") == ("just thinking", False)
    q = Record("q", None, "6", "d")
    status = [s["status"] for s in rationales.judge(q, [
        ("x=6.", "x=6. The answer is 6.", 0), ("x = 6.", "x = 6. The answer is 6.0", 1),
        ("x  =  6.", "x  =  6. The answer is $6", 2), ("y", "y The answer is 7.", 3),
        ("z", "z", 4), ("", " The answer is 6.", 5)])]
    assert status == ["kept", "kept", "duplicate", "wrong", "no answer", "empty"]


def test_batches_do_not_depend_on_ranks():
    qs = [rationales.Question(i, Record(f"q{i}", None, "1", "ab"[i % 2])) for i in range(7)]
    batches = rationales.make_batches(qs, 2)
    assert [[q.index for q in b] for b in batches] == [[0, 2], [4, 6], [1, 3], [5]]


def test_prompts(tmp_path):
    cot = rationales.make_prompter("auto", None, str(tmp_path), None)  # not a fitted teacher
    assert cot.first("2+2?") == "Q: 2+2?\nA: Let's think step by step."
    assert cot.second("2+2?", "2 and 2 make 4.") == \
        "Q: 2+2?\nA: Let's think step by step. 2 and 2 make 4. The answer is"
    assert rationales.make_prompter("auto", None, "tiny-teacher", None).first("x") == "Q: x\nA:"

    class Chat:
        chat_template = "..."

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return f"<user>{messages[0]['content']}</user><bot>"
    assert rationales.make_prompter("cot", None, "d", Chat()).first("x") == \
        "<user>x</user><bot>Let's think step by step."
    template = tmp_path / "t.txt"
    template.write_text("Question: {question}\nReasoning:\n")
    assert rationales.make_prompter("auto", str(template), "d", None).first("x") == \
        "Question: x\nReasoning:"
    template.write_text("no placeholder")
    with pytest.raises(rationales.RationaleError, match="no {question} placeholder"):
        rationales.make_prompter("auto", str(template), "d", None)


@pytest.mark.parametrize("flags,message", [
    (["--samples", "0"], "--samples must be >= 1"),
    (["--top-p", "0"], r"--top-p must be in \(0, 1\]"),
    (["--out", "x.json"], "--out must name a .jsonl file"),
    (["--teacher", "no/such/dir"], "--teacher no/such/dir: not a preset"),
    (["--data", "synthetic:4:nosuch"], "unknown synthetic domain"),
])
def test_bad_flags_are_one_line(flags, message, tmp_path, capsys):
    argv = ["--teacher", "tiny-teacher", "--data", "synthetic:2:coinflip",
            "--out", str(tmp_path / "o.jsonl"), "--no-progress", *flags]
    assert rationales.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and __import__("re").search(message, err)
    assert not (tmp_path / "o.jsonl").exists()


def test_partial_results_of_other_settings_are_refused(tmp_path, capsys):
    out = tmp_path / "o.jsonl"
    (tmp_path / "o.jsonl.partial").mkdir()
    (tmp_path / "o.jsonl.partial" / "settings.json").write_text(json.dumps({"samples": 9}))
    argv = ["--teacher", "tiny-teacher", "--data", "synthetic:2:coinflip", "--out", str(out),
            "--no-progress"]
    assert rationales.main(argv) == 2
    assert "other settings" in capsys.readouterr().err


# ------------------------------------------------------------------ training on the result
def test_rationales_of_a_question_count_once_in_the_domain_loss():
    """Two rationales of one question and another question: the domain loss and accuracy
    are those of one row per question, each rationale keeps its own task loss."""
    from prada_fast.data.format import question_index
    from prada_fast.models import PradaConfig, PradaModel, load_causal_lm
    student, tok = load_causal_lm("tiny", seed=0)
    model = PradaModel(student, PradaConfig(2, 4, loss_impl="chunked", adversary="confusion"))
    recs = [Record("3+5-2=?", "3+5=8. 8-2=6.", "6", "a"), Record("3+5-2=?", "8 then 6.", "6", "a"),
            Record("Last letters of cat dog?", "cat->t. dog->g.", "tg", "b")]
    exs = [encode(r, tok, 64, d) | {"qid": q} for r, d, q in zip(recs, [0, 0, 1], [7, 7, 3])]
    batch = Collator(tok.pad_token_id)(exs)
    assert batch["question_index"].tolist() == [0, 0, 1]
    assert question_index([1, 2, 3]) is None and question_index([1, None, 1]) is None

    def forward(b, **kw):
        return model(b["input_ids"], b["attention_mask"], b["labels"], b["domain_labels"], **kw)[1]
    once = forward(batch, question_index=batch["question_index"])
    single = forward(Collator(tok.pad_token_id)([exs[0], exs[2]]))
    twice = forward(batch)
    assert torch.allclose(once["dom"], single["dom"], atol=1e-6)
    assert not torch.allclose(twice["dom"], single["dom"], atol=1e-4)
    assert torch.equal(once["ce"], twice["ce"]) and once["n_tokens"] == twice["n_tokens"]


def test_rationales_of_a_question_are_held_out_together():
    recs = [Record(f"q{i // 3}", f"r{i}", "1", "d", question_id=f"d:q{i // 3}") for i in range(30)]
    train, held = hold_out(recs, 4, seed=0)
    assert len(held) == 4 and len({r.question for r in held}) == 4
    assert not {r.question for r in held} & {r.question for r in train}
    assert len(train) == 30 - 3 * 4
