"""Where the protocol's wrong answers come from: per arm and role, over the records' held-out
generations after training, the share that states "The answer is", the share whose every
equation "a op b = c" is right, and of the wrong answers those with a wrong equation.

    python docs/protocol26/errors.py [RECORDS_DIR]   # default: docs/protocol26/records
"""
import json
import re
import sys
from pathlib import Path

EQUATION = re.compile(r"(\d+)\s*([+\-*x/])\s*(\d+)\s*=\s*(\d+)")
OPS = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "x": int.__mul__,
       "/": lambda a, b: a // b if b else None}


def right(eq) -> bool:
    a, op, b, c = eq
    return OPS[op](int(a), int(b)) == int(c)


def main(records: Path) -> None:
    print("| arm | role | n | states the answer | all equations right "
          "| wrong answers with a wrong equation |")
    print("| --- | --- | --- | --- | --- | --- |")
    for tdir in sorted(p for p in (records / "runs").iterdir() if p.is_dir()):  # runs/<target>/<arm>
        for arm in sorted(p.name for p in tdir.iterdir() if p.is_dir()):
            rows = [json.loads(line) for f in sorted((tdir / arm).glob("seed*/generations_after.jsonl"))
                    for line in f.read_text().splitlines() if line.strip()]
            for role in ("target", "source"):
                rs = [r for r in rows if (r["domain"] == tdir.name) == (role == "target")]
                eqs = [EQUATION.findall(r["generated"]) for r in rs]
                ok = [bool(e) and all(map(right, e)) for e in eqs]
                wrong = [i for i, r in enumerate(rs) if not r["correct"]]
                bad_eq = sum(bool(eqs[i]) and not ok[i] for i in wrong)
                answered = sum("The answer is" in r["generated"] for r in rs)
                print(f"| {arm} | {role} | {len(rs)} | {answered / len(rs):.3f} | {sum(ok) / len(rs):.3f} "
                      f"| {bad_eq} of {len(wrong)} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "records")
