"""python -m prada_fast.evaluate: a run's final/ on its held-out records gives the trainer's own
end-of-run table; `#N` slices and joined jsonl columns; the generations file; bad input is
one line, exit 2; two ranks give the table of one."""
import json
import os
import subprocess
import sys

import pytest

from prada_fast import evaluate
from prada_fast.common.distributed import free_port
from prada_fast.data import answer_correct
from runner import REPO

# A data set the tiny student learns in a few steps: "always" answers yes, "parity" half yes.
ROWS = [row for i in range(24)
        for row in ({"q": f"is {i} a number?", "a": "yes", "d": "always"},
                    {"q": f"is {i} even?", "a": "no" if i % 2 else "yes", "d": "parity"})]
GENERATION = ["--max-new-tokens", "20", "--eval-batch-size", "3"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, ds_config):
    """A tiny training run that learns the answer format in 40 steps: no teacher, no domain
    loss, a constant lr after 2 warm-up steps (the test config's batch of 8)."""
    from prada_fast.train import main
    tmp = tmp_path_factory.mktemp("evaluate")
    data = tmp / "yn.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = json.loads(ds_config.read_text())
    cfg["scheduler"]["params"].update(warmup_num_steps=2, cos_min_ratio=1.0)
    (tmp / "ds.json").write_text(json.dumps(cfg))
    out = tmp / "run"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": str(free_port())}.items():
            mp.setenv(k, v)
        code = main(["--data", f"jsonl:{data}?question=q&answer=a&domain_field=d", "--teacher", "none",
                     "--no-domain-loss", "--max-steps", "40", "--lr", "5e-3", "--ds", str(tmp / "ds.json"),
                     "--eval-per-domain", "4", "--max-len", "48", "--no-progress", "--log-every", "5",
                     *GENERATION, "--output-dir", str(out)])
    assert code == 0
    return out


@pytest.fixture
def alone(monkeypatch):
    """evaluate.main in this process, no launcher."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    return evaluate.main


def test_final_on_held_out_records_is_the_trainers_table(run, alone, tmp_path):
    out = tmp_path / "acc.json"
    assert alone(["--held-out-of", str(run), "--out", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    assert (report["max_new_tokens"], report["eval_batch_size"]) == (20, 3)  # the run's
    summary = json.loads((run / "summary.json").read_text())
    assert report["final"] and report["prompt"] == "prada" and report["model"] == str(run / "final")
    after = {d: v["accuracy_after"] for d, v in summary["domains"].items()}
    assert {d: v["accuracy"] for d, v in report["domains"].items()} == after
    assert after["always"] > 0  # it learnt something: the comparison is not of zeros alone
    assert [v["records"] for v in report["domains"].values()] == [4, 4]


def test_a_run_from_before_the_question_split_is_warned_about(run, capsys):
    """run_config.json says how the held-out split was made; a run without that (trained
    when records, not questions, were held out) gets today's split with a warning."""
    from prada_fast.trainer.settings import held_out_records
    config = json.loads((run / "run_config.json").read_text())
    assert config["held_out_by"] == "question"
    now, _, _ = held_out_records(config, where="RUN")
    assert "warning" not in capsys.readouterr().err
    del config["held_out_by"]
    old, _, _ = held_out_records(config, where="RUN")
    assert capsys.readouterr().err.startswith("warning: RUN was trained before a held-out question")
    assert [r.question for r in old] == [r.question for r in now] and len(now) == 8


def test_slices_joined_columns_and_generations(alone, tmp_path, capsys):
    (tmp_path / "svamp.json").write_text(json.dumps(
        [{"Body": f"Tom has {i} apples.", "Question": "How many?", "Answer": i} for i in range(5)]))
    gens, out = tmp_path / "g.jsonl", tmp_path / "a.json"
    svamp = f"jsonl:{tmp_path}/svamp.json?question={{Body}} {{Question}}&answer=Answer&domain=svamp#2"
    argv = ["--model", "tiny", "--data", "synthetic:5:coinflip#3", "--data", svamp,
            "--max-new-tokens", "4", "--save-generations", str(gens), "--out", str(out), "--no-progress"]
    assert alone(argv) == 0
    rows = [json.loads(line) for line in gens.read_text().splitlines()]
    assert [r["domain"] for r in rows] == ["coinflip"] * 3 + ["svamp"] * 2
    assert rows[3]["question"] == "Tom has 0 apples. How many?" and rows[4]["gold"] == "1"
    for r in rows:
        assert set(r) == {"question", "gold", "generated", "predicted", "correct", "domain"}
        assert isinstance(r["generated"], str) and r["correct"] == answer_correct(r["predicted"], r["gold"])
    report = json.loads(out.read_text())
    assert report["records"] == 5 and report["domains"]["svamp"]["records"] == 2
    table = capsys.readouterr().out
    assert "coinflip" in table and "svamp" in table and "accuracy" in table


@pytest.mark.parametrize("argv,words", [
    (["--model", "tiny", "--data", "nosuch/gsm8k_test.jsonl"], ["--data", "no such file"]),
    (["--model", "tiny", "--data", "synthetic:0"], ["--data", "positive integer"]),
    (["--model", "TMP/missing", "--data", "synthetic:2"], ["--model", "TMP/missing"]),
    (["--model", "tiny"], ["--data", "--held-out-of"]),
    (["--held-out-of", "TMP"], ["--held-out-of", "run_config.json"]),
])
def test_bad_input_is_one_line_exit_2(argv, words, alone, tmp_path, capsys):
    argv = [a.replace("TMP", str(tmp_path)) for a in argv]
    assert alone([*argv, "--out", str(tmp_path / "a.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert all(w.replace("TMP", str(tmp_path)) in err[0] for w in words), err
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.slow
def test_two_ranks_give_the_table_of_one(alone, tmp_path):
    argv = ["--model", "tiny", "--data", "synthetic:3:coinflip,lastletter", "--eval-batch-size", "2",
            "--max-new-tokens", "4", "--no-progress"]
    assert alone([*argv, "--out", str(tmp_path / "a1.json"),
                  "--save-generations", str(tmp_path / "g1.jsonl")]) == 0
    env = {**{k: v for k, v in os.environ.items()
              if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")},
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "prada_fast.evaluate", *argv, "--out", str(tmp_path / "a2.json"),
           "--save-generations", str(tmp_path / "g2.jsonl")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    heads = [line for line in proc.stdout.splitlines() if line.split()[:2] == ["domain", "records"]]
    assert len(heads) == 1, proc.stdout  # rank 0 alone reports
    one, two = (json.loads((tmp_path / f"a{n}.json").read_text()) for n in (1, 2))
    assert (one["ranks"], two["ranks"]) == (1, 2) and two["domains"] == one["domains"]
    assert (tmp_path / "g2.jsonl").read_text() == (tmp_path / "g1.jsonl").read_text()
