"""The GPU-scale run matrix of issue 17, K runs at a time on one GPU, resumable; each run's numbers at equal tokens
in `<root>/runs/<name>-seed<s>/eval.json` (bench/gpu_scale_eval.py), tables and figures by bench/gpu_scale_report.py.

    python -m bench.gpu_scale plan                       the runs, their commands and the predicted time
    python -m bench.gpu_scale run   [--parallel K] ...   train and evaluate every unfinished run, K at a time
    python -m bench.gpu_scale start [--parallel K] ...   the same, detached (setsid): it outlives the `run` call
    python -m bench.gpu_scale wait --seconds S [--out D] print progress until everything is done or S seconds
                                                         pass (then collect into D)
    python -m bench.gpu_scale collect --out DIR          results (metrics, eval.json, configs, logs) as tar files

The matrix (every run: the packaged SmolLM2-135M-Instruct student, the shipped gsm_symbolic training set, one epoch
over the same `n_samples` items per seed — so every run of a seed sees the same tokens —, bf16, the fused Triton KV
loss, ZeRO-3 on one GPU through the trainer's single-process path):

| name | question | loss |
| --- | --- | --- |
| ce_only | baseline | CE on the gold rationale only (δ = 1, λ_K = λ_V = β = 0); the Phase 1 teachers run for the CKA |
| kv_single | single vs multi | CE + KV, the CoT prompt's teacher alone (α = [1]) |
| kv_fused | single vs multi, baseline | CE + KV, default and CoT teachers fused (α = [0.7, 0.3]) |
| cross_fixed | router | CE + KV, SmolLM2 (CoT) + Gemma3-270M (CoT) teachers, α = [0.5, 0.5], ridge adapters |
| cross_learnable | router | the same with the learnable router (Phase 4) |
| kv_only | signals | KV only (δ = 0), the fused Phase 1 teachers |

"CE + KV" is the plan's recipe (docs/PLAN.md §3): δ holds 0 for the first half and ramps to 0.1 at the end
(`delta_final 0.1`, `warmin_start 0.5`); the CE-only baseline trains with δ = 1 throughout.

A run is finished when its eval.json exists (skipped); a run whose trainer stopped resumes from its newest
checkpoint (the trainer's own resume); a trained run without eval.json is only evaluated. Runs whose models are not
in the model cache yet (bench/stage_models.py brings them) wait while the others go first.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvfuse.net import free_port

REPO = Path(__file__).resolve().parent.parent
STUDENT = "smollm2-135m-instruct"
GEMMA = "gemma3-270m"

# Every run: one epoch over N_SAMPLES items of gsm_symbolic (≈ 194 student tokens each with the default prompt:
# 5400 items ≈ 1.05 M training tokens; `plan` counts them exactly), N_VAL held-out items for the curves.
COMMON = {"model_name": STUDENT, "dataset": "gsm_symbolic", "n_samples": 5400, "n_val": 200, "epochs": 1,
          "micro_batch": 32, "effective_batch": 32, "eval_every": 34, "save_every": 85, "keep_checkpoints": 1,
          "n_generate": 0, "export_student": "true", "max_length": 512, "dtype": "bf16", "loss_backend": "auto"}
CE_KV = {"delta": 0.0, "delta_final": 0.1, "warmin_start": 0.5}
PHASE1 = {"teacher_prompts": ["default", "cot"], "alpha": [0.7, 0.3]}
CROSS = {"teachers": [STUDENT, GEMMA], "teacher_prompts": ["cot", "cot"], "student_layers": "all"}


@dataclass(frozen=True)
class Setup:
    name: str
    phase: int
    overrides: dict
    models: tuple[str, ...]
    summary: str


MATRIX = (
    Setup("ce_only", 1, {**PHASE1, "lambda_k": 0.0, "lambda_v": 0.0, "beta": 0.0, "delta": 1.0, "delta_final": 1.0},
          (STUDENT,), "CE only (SFT on the gold rationales)"),
    Setup("kv_single", 1, {**PHASE1, "teacher_prompts": ["cot"], "alpha": [1.0], **CE_KV}, (STUDENT,),
          "CE + KV, one teacher (CoT prompt)"),
    Setup("kv_fused", 1, {**PHASE1, **CE_KV}, (STUDENT,), "CE + KV, two teachers fused (default + CoT, 0.7/0.3)"),
    Setup("kv_only", 1, {**PHASE1, "delta": 0.0, "delta_final": 0.0}, (STUDENT,),
          "KV only (δ = 0), two teachers fused"),
    Setup("cross_fixed", 3, {**CROSS, "alpha": [0.5, 0.5], **CE_KV}, (STUDENT, GEMMA),
          "CE + KV, SmolLM2 + Gemma3 teachers, fixed α = [0.5, 0.5]"),
    Setup("cross_learnable", 4, {**CROSS, **CE_KV}, (STUDENT, GEMMA),
          "CE + KV, SmolLM2 + Gemma3 teachers, learnable router"),
    # The first GPU session's reading: the plan's warm-in (δ 0 → 0.1) displaces SFT, so the KV term is also judged
    # on top of CE at full weight.
    Setup("sft_plus_kv", 1, {**PHASE1, "delta": 1.0, "delta_final": 1.0}, (STUDENT,),
          "CE at full weight (δ = 1) + KV, two teachers fused"),
)
SEEDS = (0, 1, 2)
# the untrained student scored alone (runs/base/eval.json): the table's reference point
BASE = Setup("base", 0, {}, (STUDENT,), "the untrained student")

# The prediction `plan` and `run` print: one process's training tokens per second by phase, the median of its runs'
# per-step rates on the H200 with two or three runs sharing a GPU (bench/results/gpu_scale, 2026-11-30: Phase 1
# 7.2-9.0k, the cross pair 6.2-7.5k).
PREDICTED_TOKENS_PER_S = {1: 8_500, 3: 7_000, 4: 6_500}
GPU_TOKENS_PER_S = 40_000   # assumed ceiling of K processes together (the low end of 40-80k: kernels time-sliced)
STARTUP_S = 90              # imports, model loads, ridge calibration, DeepSpeed, the first Triton compiles
# One in-training evaluation (200 + 200 items, CKA on the GPU) and the scoring process (1319 GSM8K questions in 3
# batches of 512 × ≤ 256 decode steps), from the 2026-11-30 runs: start to `trained` 350 s for 155 s of steps, the
# scoring 76 s.
EVAL_S = 15
GSM8K_S = 75


@dataclass
class Run:
    setup: Setup
    seed: int
    root: Path
    extra: dict = field(default_factory=dict)        # trainer keys set for every run (--set KEY VALUE)
    eval_args: tuple[str, ...] = ()                   # passed to bench/gpu_scale_eval.py

    @property
    def values(self) -> dict:
        return {**COMMON, **self.setup.overrides, **self.extra, "seed": self.seed, "output_dir": str(self.dir)}

    @property
    def models(self) -> set[str]:
        """The model names this run loads: the student and each teacher (model_name under each prompt when
        `teachers` is empty)."""
        values = self.values
        return {values["model_name"], *(values.get("teachers") or [])}

    @property
    def name(self) -> str:
        return "base" if self.setup is BASE else f"{self.setup.name}-seed{self.seed}"

    @property
    def dir(self) -> Path:
        return self.root / "runs" / self.name

    def trainer_args(self) -> list[str]:
        args = ["--phase", str(self.setup.phase)]
        for key, value in self.values.items():
            args += [f"--{key}", *(map(str, value) if isinstance(value, list) else [str(value)])]
        return args

    def command(self) -> str:
        """The trainer command as docs quote it (output under runs/gpu_scale/)."""
        args = self.trainer_args()
        args[args.index("--output_dir") + 1] = f"runs/gpu_scale/{self.name}"
        return shlex.join(["python", "train/main.py", *args])

    def state(self) -> str:
        if (self.dir / "eval.json").is_file():
            return "done"
        if self.setup is BASE:
            return "trained"        # nothing to train: only scored
        if (self.dir / "student" / "config.json").is_file() and (self.dir / "train.done").is_file():
            return "trained"
        return "started" if (self.dir / "metrics.jsonl").is_file() else "pending"


def all_runs(root: Path, names: list[str] | None, seeds: list[int], extra: dict,
             eval_args: tuple[str, ...] = ()) -> list[Run]:
    setups = [s for s in MATRIX if names is None or s.name in names]
    if names and len(setups) != len(set(names)):
        raise SystemExit(f"unknown setup(s) {sorted(set(names) - {s.name for s in MATRIX})}; "
                         f"choose from {[s.name for s in MATRIX]}")
    # the untrained student first (one short evaluation), then seed-major: every setup of seed 0 first, so an
    # interrupted session still has whole comparisons
    return [Run(BASE, 0, root, extra, eval_args)] + [Run(s, seed, root, extra, eval_args) for seed in seeds
                                                      for s in setups]


def models_ready(models: set[str]) -> bool:
    """Whether every packaged model among `models` is converted in the model cache (others load as they are)."""
    from kvfuse.models.packaged import PACKAGED_MODELS, cache_dir

    return all((cache_dir(m) / "config.json").is_file() for m in models if m in PACKAGED_MODELS)


# --------------------------------------------------------------------------------------------------- prediction

def training_tokens(runs: list[Run]) -> dict[int, int]:
    """Exact student input tokens of one epoch, per seed (the split depends on the seed only)."""
    from kvfuse.data import load_examples, render, resolve_prompt
    from kvfuse.models.load import load_tokenizer

    values = runs[0].values
    tokenizer = load_tokenizer(values["model_name"])
    out = {}
    for seed in sorted({r.seed for r in runs}):
        train, _ = load_examples(values["dataset"], int(values["n_samples"]), int(values["n_val"]), seed)
        total = 0
        for ex in train:
            rendered = render(tokenizer, resolve_prompt("default"), ex)
            total += len(tokenizer(rendered.text, add_special_tokens=rendered.add_special_tokens).input_ids)
        out[seed] = total
    return out


def predict(runs: list[Run], parallel: int, tokens: dict[int, int],
            done_elsewhere: frozenset[str] = frozenset()) -> tuple[float, list[str]]:
    """(predicted wall seconds, one line per run), by simulating the runner second by second over the runs still to
    do (not done here nor in `done_elsewhere`): up to `parallel` runs at once, each starting (STARTUP_S), training
    at its own rate or an equal share of the GPU's among the runs training at that moment (whichever is lower), then
    evaluating (EVAL_S each, GSM8K_S)."""
    lines, jobs = [], []
    for run in runs:
        n, steps = tokens[run.seed], n_steps(run)
        state = "done elsewhere" if run.name in done_elsewhere and run.state() != "done" else run.state()
        lines.append(f"{run.name:<24} {n / 1e6:.3f} M tokens, {steps} steps  [{state}]")
        if state.startswith("done"):
            continue
        if run.setup is BASE:
            job = [STARTUP_S / 3, 0.0, GSM8K_S, 0.0]
        else:
            job = [STARTUP_S, float(n), EVAL_S * (steps // int(run.values["eval_every"]) + 2) + GSM8K_S,
                   float(PREDICTED_TOKENS_PER_S[run.setup.phase])]
        jobs.append(job)
    pending, active, t = list(jobs), [], 0
    while pending or active:
        while pending and len(active) < parallel:
            active.append(pending.pop(0))
        training = [j for j in active if j[0] <= 0 and j[1] > 0]
        for j in active:
            if j[0] > 0:
                j[0] -= 1
            elif j[1] > 0:
                j[1] -= min(j[3], GPU_TOKENS_PER_S / len(training))
            else:
                j[2] -= 1
        active = [j for j in active if j[2] > 0]
        t += 1
    return float(t), lines


def finished_in(source: Path) -> frozenset[str]:
    """Names of the runs finished under source/runs (those with an eval.json)."""
    if not (source / "runs").is_dir():
        raise SystemExit(f"--done_from {source}: there is no runs/ folder there to take finished runs from")
    return frozenset(p.parent.name for p in (source / "runs").glob("*/eval.json"))


def adopt_finished(source: Path, root: Path) -> list[str]:
    """Copy the eval.json (and config.yaml) of every run finished under source/runs into root/runs where that run
    has none, so a fresh machine continues a matrix an earlier session began (the repository keeps these files,
    bench/NOTES.md). Returns the names adopted."""
    adopted = []
    for name in sorted(finished_in(source)):
        done = source / "runs" / name / "eval.json"
        target = root / "runs" / name
        if (target / "eval.json").is_file():
            continue
        target.mkdir(parents=True, exist_ok=True)
        for name in ("config.yaml", "eval.json"):  # eval.json last: it is what marks the run done
            if (done.parent / name).is_file():
                shutil.copy2(done.parent / name, target / name)
        adopted.append(done.parent.name)
    return adopted


def n_steps(run: Run) -> int:
    values = run.values
    return -(-int(values["n_samples"]) // int(values["effective_batch"]))


# ------------------------------------------------------------------------------------------------------- running

def child_env(port: int, threads: int, site: Path | None, gpu: int | None = None) -> dict:
    """One run's environment: a world of one on its own rendezvous port, its share of the CPU threads, offline, and
    on several GPUs its own one. NVLink multicast stays off (the lending machines' rule)."""
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               HF_HUB_OFFLINE="1", NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
               # batches of varying length fragment the caching allocator; expandable segments return the gaps
               PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    paths = [str(site)] if site else []
    env["PYTHONPATH"] = os.pathsep.join(paths + [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def launch(run: Run, port: int, threads: int, site: Path | None, gpu: int | None = None) -> subprocess.Popen:
    """The run's next step as a child process: training (resuming), or, once trained, the evaluation."""
    run.dir.mkdir(parents=True, exist_ok=True)
    env = child_env(port, threads, site, gpu)
    if run.state() == "trained":
        if run.setup is BASE:
            extra, model = {"name": run.name, "summary": run.setup.summary}, ["--model", run.values["model_name"]]
        else:
            extra, model = {"name": run.name, "setup": run.setup.name, "seed": run.seed,
                            "summary": run.setup.summary, "command": run.command()}, []
        cmd = [sys.executable, "-m", "bench.gpu_scale_eval", str(run.dir), "--extra", json.dumps(extra), *model,
               *run.eval_args]
        log = run.dir / "eval.log"
    else:
        cmd = [sys.executable, str(REPO / "train" / "main.py"), *run.trainer_args()]
        log = run.dir / "train.log"
    with open(log, "a") as fh:
        fh.write(f"\n$ {shlex.join(cmd)}\n")
        fh.flush()
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)


def pick_gpu(busy: list[int | None], n_gpus: int, per_gpu: int) -> tuple[bool, int | None]:
    """(may a run start now, on which GPU) given the GPUs of the active runs: on several GPUs the one running the
    fewest, on one GPU or none the environment's (None); at most `per_gpu` runs on a GPU, since one run's peak
    was 32–55 GB on a 140 GB H200 and six on one GPU ran out of memory (bench/NOTES.md). No cap without a GPU."""
    if n_gpus == 0:
        return True, None
    if n_gpus == 1:
        return len(busy) < per_gpu, None
    gpu = min(range(n_gpus), key=busy.count)
    return busy.count(gpu) < per_gpu, gpu


def run_all(runs: list[Run], parallel: int, site: Path | None, poll_s: float = 5.0, per_gpu: int = 2) -> int:
    """Train and evaluate every unfinished run, `parallel` children at a time and at most `per_gpu` on a GPU; a
    child that fails is reported and its run is not tried again in this call (the next call retries it). Returns
    the number of failed runs."""
    threads = max(1, (os.cpu_count() or 2) // max(1, parallel))
    active: dict[str, tuple[Run, subprocess.Popen, int | None]] = {}
    try:
        return _schedule(runs, parallel, site, poll_s, threads, active, _gpu_count(), per_gpu)
    finally:
        # a runner that stops (SIGTERM, an error) takes its children with it: a later runner must not find a run
        # still being trained by an orphan
        for _, proc, _ in active.values():
            proc.terminate()
        for _, proc, _ in active.values():
            proc.wait()


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def _schedule(runs, parallel, site, poll_s, threads, active, n_gpus: int, per_gpu: int) -> int:
    failed: set[str] = set()
    ports: set[int] = set()
    while True:
        for name, (run, proc, _) in list(active.items()):
            code = proc.poll()
            if code is None:
                continue
            del active[name]
            if code != 0:
                failed.add(name)
                log = run.dir / ("eval.log" if run.state() == "trained" else "train.log")
                tail = log.read_text(errors="replace").replace("\r", "\n").splitlines()[-6:] if log.is_file() else []
                print(f"{time.strftime('%T')} {name}: failed (exit {code}); the end of {log}:\n    "
                      + "\n    ".join(tail), flush=True)
            elif run.state() == "started":
                (run.dir / "train.done").write_text("ok\n")
                print(f"{time.strftime('%T')} {name}: trained", flush=True)
            else:
                if run.state() == "done":
                    # evaluated: the resume state (weights + Adam, ~2 GB) is no longer needed; the student stays
                    shutil.rmtree(run.dir / "checkpoints", ignore_errors=True)
                print(f"{time.strftime('%T')} {name}: {run.state()}", flush=True)
        todo = [r for r in runs if r.state() != "done" and r.name not in failed and r.name not in active]
        if not todo and not active:
            return len(failed)
        for run in todo:
            if len(active) >= parallel:
                break
            if not models_ready(run.models):
                continue
            room, gpu = pick_gpu([g for _, _, g in active.values()], n_gpus, per_gpu)
            if not room:
                break
            port = free_port()
            while port in ports:
                port = free_port()
            ports.add(port)
            print(f"{time.strftime('%T')} {run.name}: {'evaluating' if run.state() == 'trained' else 'training'}",
                  flush=True)
            active[run.name] = (run, launch(run, port, threads, site, gpu), gpu)
        time.sleep(poll_s)


# ------------------------------------------------------------------------------------------ detached and results

def _pid_alive(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _drop_option(argv: list[str], name: str) -> list[str]:
    """argv without `name VALUE` and `name=VALUE`."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out


def start_detached(root: Path, argv: list[str]) -> None:
    """`run` in a new session (setsid), logging to <root>/runner.log, from a copy of this tree (the `run` call's
    next copy of the repository must not change files under a training run)."""
    root.mkdir(parents=True, exist_ok=True)
    pid = _pid_alive(root / "runner.pid")
    if pid:
        print(f"runner already running (pid {pid}); log {root / 'runner.log'}")
        return
    src = root / "src"
    if src.exists():
        shutil.rmtree(src)
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".stage", ".whl", ".git", "runs", "__pycache__",
                                                             ".venv", "build", "out"))
    log = open(root / "runner.log", "a")
    proc = subprocess.Popen([sys.executable, "-m", "bench.gpu_scale", "run", *argv], cwd=src, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                                filter(None, [str(src), os.environ.get("PYTHONPATH")])), PYTHONUNBUFFERED="1"))
    (root / "runner.pid").write_text(str(proc.pid))
    print(f"runner started (pid {proc.pid}) from {src}; log {root / 'runner.log'}")


def progress(runs: list[Run]) -> str:
    """Runs per state, and for each run in training its step and its last step's (supervised) tokens/s."""
    counts: dict[str, int] = {}
    training = []
    for r in runs:
        state = r.state()
        counts[state] = counts.get(state, 0) + 1
        if state == "started" and not (r.dir / "train.done").is_file():
            last = _last_train_event(r.dir / "metrics.jsonl")
            if last:
                training.append(f"{r.name} step {last['step']}/{n_steps(r)} {last['tokens_per_s']:.0f} tok/s")
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + "".join(f"\n  {t}" for t in training)


def _last_train_event(path: Path) -> dict | None:
    for line in reversed(path.read_text().splitlines() if path.is_file() else []):
        if '"split": "train"' in line:
            return json.loads(line)
    return None


def wait(root: Path, runs: list[Run], seconds: float) -> None:
    """Print what the runner logged since the last `wait` (each call shows only what is new), until it stops or
    `seconds` pass; then one line of progress."""
    log, seen, end = root / "runner.log", root / "runner.log.shown", time.time() + seconds
    offset = int(seen.read_text()) if seen.is_file() else 0
    while True:
        if log.is_file():
            text = log.read_text()
            print(text[offset:], end="", flush=True)
            offset = len(text)
            seen.write_text(str(offset))
        alive = _pid_alive(root / "runner.pid")
        if not alive or time.time() >= end:
            print(f"{time.strftime('%T')} runs: {progress(runs)}; runner {'running' if alive else 'not running'}",
                  flush=True)
            return
        time.sleep(min(15.0, max(0.0, end - time.time())))


def collect(root: Path, out: Path, max_bytes: int = 15 * 2 ** 20, max_files: int = 4) -> list[Path]:
    """Each run's small files into at most `max_files` tar.gz files of at most `max_bytes` (a `run` call brings
    back 8 files of 16 MiB, 64 MiB in all): the numbers first (eval.json, metrics.jsonl, config.yaml), then the
    generations and logs, the HTML reports last; what does not fit is named and left out."""
    out.mkdir(parents=True, exist_ok=True)
    names = ("eval.json", "metrics.jsonl", "config.yaml", "gsm8k_generations.jsonl.gz", "eval.log", "train.log",
             "report.html")
    files = [p for p in (root / "runner.log",) if p.is_file()]
    files += sorted((p for p in (root / "runs").glob("*/*") if p.name in names),
                    key=lambda p: (names.index(p.name), str(p)))
    tars, current, size = [], None, 0
    for path in files:
        n = path.stat().st_size
        if n > max_bytes or (size + n > max_bytes and len(tars) == max_files):
            print(f"collect: {path} ({n / 2**20:.1f} MiB) does not fit; left out")
            continue
        if current is None or size + n > max_bytes:
            if current is not None:
                current.close()
            tars.append(out / f"gpu_scale_{len(tars) + 1}.tar.gz")
            current, size = tarfile.open(tars[-1], "w:gz"), 0
        current.add(path, arcname=str(path.relative_to(root)))
        size += n
    if current is not None:
        current.close()
    return tars


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("plan", "run", "start", "wait", "collect"))
    parser.add_argument("--root", type=Path, default=Path(os.environ.get("KVFUSE_GPU_SCALE",
                                                                          Path.home() / "gpu_scale")),
                        help="where runs live (default $KVFUSE_GPU_SCALE or ~/gpu_scale)")
    parser.add_argument("--only", nargs="+", default=None, help="these setups only (default: the whole matrix)")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS), help="default 0 1 2")
    parser.add_argument("--parallel", type=int, default=6, help="runs at once (default 6)")
    parser.add_argument("--per_gpu", type=int, default=2, help="runs at once on one GPU (default 2: memory)")
    parser.add_argument("--site", type=Path, default=None, help="folder of installed wheels to put on PYTHONPATH")
    parser.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="override a trainer key for every run (tests: --set n_samples 4)")
    parser.add_argument("--eval_limit", type=int, default=None, help="GSM8K questions per evaluation (tests; "
                                                                     "default all 1319)")
    parser.add_argument("--eval_max_new_tokens", type=int, default=None, help="cap on generated tokens (default: "
                                                                              "bench/gpu_scale_eval.py's)")
    parser.add_argument("--done_from", type=Path, default=None,
                        help="run, start, plan: a folder holding runs/<name>/eval.json of runs finished elsewhere "
                             "(e.g. bench/results/gpu_scale): they count as done here and are not run again (plan "
                             "only leaves them out of its prediction)")
    parser.add_argument("--seconds", type=float, default=540, help="wait: how long at most (default 540)")
    parser.add_argument("--out", type=Path, default=None, help="collect (and wait, after waiting): where the tar "
                                                               "files go")
    args = parser.parse_args(argv)
    if args.parallel < 1 or args.per_gpu < 1:
        parser.error(f"--parallel and --per_gpu must be at least 1 (got {args.parallel}, {args.per_gpu})")
    extra = {k: v for k, v in args.set}
    eval_args = (() if args.eval_limit is None else ("--limit", str(args.eval_limit))) + (
        () if args.eval_max_new_tokens is None else ("--max_new_tokens", str(args.eval_max_new_tokens)))
    if args.done_from is not None and args.action in ("run", "start"):  # `start` runs from a copy without runs/
        print(f"adopted as done: {adopt_finished(args.done_from, args.root)}", flush=True)
    runs = all_runs(args.root, args.only, args.seeds, extra, eval_args)
    if args.action == "plan" or args.action == "run":
        student = runs[0].values["model_name"]
        if args.action == "run" and not models_ready({student}):
            # started before staging brought the student (bench/gpu_scale_session.sh): wait for it
            print(f"{time.strftime('%T')} waiting for {student} to be staged", flush=True)
            while not models_ready({student}):
                time.sleep(5)
        tokens = training_tokens(runs)
        elsewhere = frozenset() if args.done_from is None else finished_in(args.done_from)
        seconds, lines = predict(runs, args.parallel, tokens, elsewhere)
        print("\n".join(lines))
        todo = sum(r.state() != "done" and r.name not in elsewhere for r in runs)
        print(f"predicted: {seconds / 60:.1f} min for the {todo} runs to do, {args.parallel} at a time (assumed: "
              f"{PREDICTED_TOKENS_PER_S} tokens/s for one process by phase, {GPU_TOKENS_PER_S} for all together)",
              flush=True)
        if args.action == "plan":
            for run in runs[1:]:
                print(run.command())
            return 0
        if min(tokens.values()) < 1_000_000 and "n_samples" not in extra:
            raise SystemExit(f"a seed trains on fewer than 1 M tokens ({tokens}): raise n_samples")
        (args.root / "runs").mkdir(parents=True, exist_ok=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        failed = run_all(runs, args.parallel, args.site, per_gpu=args.per_gpu)
        print(f"{time.strftime('%T')} finished: {progress(runs)}; {failed} failed", flush=True)
        return 1 if failed else 0
    if args.action == "start":
        # the runs were adopted above, into the same root; the detached runner's copy of the tree has no runs/
        # folders, so it must not look for them again
        start_detached(args.root, _drop_option([a for a in argv if a != "start"], "--done_from")
                       + ["--root", str(args.root)])
    elif args.action == "wait":
        from bench.stage_models import home_stage, status

        print(f"staged: {json.dumps(status(home_stage()))}")
        wait(args.root, runs, args.seconds)
        if args.out is not None:
            for tar in collect(args.root, args.out):
                print(f"{tar} ({tar.stat().st_size / 2**20:.1f} MiB)")
    else:
        if args.out is None:
            raise SystemExit("collect needs --out DIR")
        for tar in collect(args.root, args.out):
            print(f"{tar} ({tar.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
