"""The CUDA path on one GPU, checked by one command in under 10 minutes (run through `scripts/gpu_check.sh`,
which installs what the interpreter lacks):

    scripts/gpu_check.sh [--wheelhouse DIR] [--out bench/results/gpu_check.json] [--device cuda|cpu]
        [--size real|tiny] [--corpus FILE] [--lines N] [--steps 30] [--batch_size 16] [--jobs N]
        [--alignments match,reduce,reduce_map,uld,dskd] [--precisions bf16,fp16] [--bench_configs ...]
        [--work_dir DIR]

Stages, each recorded in one JSON (`--out`) whatever the others do:
1. `environment`: Python, torch, CUDA, the device, native bf16, nccl, and the version of every package pinned in
   requirements.txt next to its pin (the checks below run on the machine's own torch);
2. `fixtures`: bench/real_scale.py's set-up at `--size` (real: a 120K WordPiece teacher vocabulary trained on the
   corpus, a random BERT 12 x 768 teacher, `run_pipeline.py` with the paper's student, DistilBERT 3 x 264 and a
   30K vocabulary);
3. `teacher_cache`: `preprocessing/cache_teacher.py` on the device in bf16 (sample, K 16) for every alignment
   that a cache can serve (match, reduce, reduce_map);
4. `training`: for every alignment and precision (fp16 trains with GradScaler), online (the teacher in the
   loop) and, where the alignment has one, from its teacher cache: a 1-process `torchrun` of train.py (a torchrun launch joins a
   process group even with one process: nccl on CUDA, gloo on CPU, DDP around the student) for `--steps`
   updates; pass = exit 0, the summary's update count, finite losses in the log; recorded: wall time, the
   log's last student tokens/s and memory;
5. `kill_resume`: two uninterrupted fp16 match runs (their difference is the device's non-determinism) and a
   third killed with SIGKILL (its whole process group) once its first checkpoint exists, then relaunched with
   `--load_from_checkpoint DUMP` (the newest checkpoint); pass = the resumed run's final weights differ from the
   first run's by at most 10 x the two uninterrupted runs' difference (exactly equal where that is 0, as on
   CPU);
6. `benchmark`: `bench/real_scale.py --quick --device D --sizes S --configs ...` (its JSON is embedded).
Exit 0 when every check passed, 1 otherwise (2: bad arguments). `--device cpu --size tiny` rehearses all of it
on a CPU (the tests do).

`--pins` prints the requirements.txt pins of GPU_PACKAGES and `--missing_pins` those this interpreter lacks or
has at another version; both import nothing but the standard library (gpu_check.sh and gpu_wheels.sh use
them).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GPU_PACKAGES = ("transformers", "tokenizers", "huggingface_hub", "hf-xet", "httpx2", "httpcore2", "truststore",
                "safetensors", "tensorboardX", "GitPython", "gitdb", "smmap", "geoopt", "rapidfuzz")
"""Installed at their pinned versions on top of a machine's own CUDA torch: what the project imports that a
GPU image may lack (TensorBoard writer, git, geoopt, rapidfuzz) and the Hugging Face stack whose version the project's
behaviour depends on. numpy, scipy, matplotlib, psutil, tqdm and scikit-learn are taken as the machine has them
(their versions are recorded)."""
ALIGNMENTS = ("match", "reduce", "reduce_map", "uld", "dskd")
PRECISIONS = ("bf16", "fp16")
ALIGNMENT_FLAGS = {"reduce_map": ["--sum_probs"]}
"""train.py flags per alignment beyond --pipeline_dir's (reduce_map combines pieces by logsumexp, as the paper)."""
STEP_LINE = re.compile(r"step (\d+): (loss=.*)$")
RUN_TIMEOUT = 600


class CheckError(Exception):
    """A bad argument: one line, exit 2."""


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(names=GPU_PACKAGES) -> dict[str, str]:
    """{package: pinned version} from requirements.txt for `names`."""
    wanted = {_norm(n) for n in names}
    out = {}
    for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = (x.strip() for x in line.split("==", 1))
            if _norm(name) in wanted:
                out[name] = version
    missing = wanted - {_norm(n) for n in out}
    if missing:
        raise CheckError(f"requirements.txt pins none of {sorted(missing)}; pin them or update GPU_PACKAGES")
    return out


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def missing_pins() -> list[str]:
    """`name==version` of each GPU_PACKAGES pin this interpreter lacks or has at another version."""
    return [f"{n}=={v}" for n, v in pins().items() if installed(n) != v]


# ------------------------------------------------------------------------------------------ stages


def environment() -> dict:
    """Interpreter, torch and device facts, and every requirements.txt pin next to the installed version."""
    import platform

    import torch

    env = {"python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
           "cuda_runtime": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "nccl_available": torch.distributed.is_nccl_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1), device_count=torch.cuda.device_count(),
                   bf16_supported=torch.cuda.is_bf16_supported())
        if env["nccl_available"]:
            env["nccl"] = ".".join(str(x) for x in torch.cuda.nccl.version())
    every = {}
    for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines():
        if "==" in line:
            name, version = (x.strip() for x in line.split("==", 1))
            every[name] = {"pinned": version, "installed": installed(name)}
    env["packages"] = every
    env["gpu_packages_at_pin"] = not missing_pins()
    return env


def _run_environment(_cfg: dict) -> dict:
    return environment()


def prepare_fixtures(a: argparse.Namespace, work: Path) -> dict:
    """bench/real_scale.py's corpus slice, teacher and pipeline at `--size` (workers of their own)."""
    from bench import real_scale
    from bench.train_step import torch, workers

    _, isolation = workers(None, "auto", torch.device(a.device))
    bench_args = argparse.Namespace(corpus=a.corpus, lines=a.lines, teacher_lines=0, max_len=128)
    base = {"device": a.device, "threads": os.cpu_count() or 1, "seed": 0, "isolated": True}
    return real_scale.prepare_size(a.size, base, bench_args, isolation, work)


def _subprocess_env(a: argparse.Namespace) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "RVKD_NO_TQDM": "1", "PYTHONUNBUFFERED": "1"}
    if a.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, a.jobs))))
    return env


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL `proc` and every descendant (torchrun starts its workers in sessions of their own, so killing the
    launcher's process group would leave them running), then reap `proc`."""
    import psutil

    try:
        victims = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        victims = []
    for victim in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            victim.send_signal(signal.SIGKILL)
    psutil.wait_procs([v for v in victims if v.pid != proc.pid], timeout=30)
    proc.wait()


def run_logged(argv: list[str], log: Path, env: dict[str, str], kill_when: Path | None = None) -> dict:
    """Run `argv` with output to `log`; with `kill_when`, SIGKILL it and its descendants as soon as that path
    exists (a machine's crash). Returns rc, seconds and whether it was killed."""
    t0 = time.perf_counter()
    with log.open("w", encoding="utf-8") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        killed = False
        try:
            while proc.poll() is None:
                if kill_when is not None and kill_when.exists():
                    kill_tree(proc)
                    killed = True
                    break
                if time.perf_counter() - t0 > RUN_TIMEOUT:
                    kill_tree(proc)
                    return {"rc": None, "seconds": round(time.perf_counter() - t0, 2),
                            "error": f"timed out after {RUN_TIMEOUT} s"}
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                kill_tree(proc)
    return {"rc": proc.returncode, "seconds": round(time.perf_counter() - t0, 2), "killed": killed}


def log_tail(log: Path, n: int = 15) -> str:
    try:
        return "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def build_cache(a: argparse.Namespace, work: Path, alignment: str, env: dict[str, str]) -> dict:
    """preprocessing/cache_teacher.py for `alignment` on the device (bf16 teacher on CUDA, fp32 on CPU)."""
    out = work / "caches" / alignment
    out.parent.mkdir(parents=True, exist_ok=True)
    precision = "bf16" if a.device == "cuda" else "fp32"
    argv = [sys.executable, "preprocessing/cache_teacher.py", "--pipeline_dir", str(work / "pipeline"),
            "--teacher_name", str(work / "teacher"), "--align_logits", alignment, "--format", "sample",
            "--k", "16", "--precision", precision, "--device", a.device, "--out", str(out)]
    log = work / "logs" / f"cache_{alignment}.log"
    result = {"alignment": alignment, "precision": precision, **run_logged(argv, log, env)}
    result["ok"] = result["rc"] == 0 and (out / "cache.json").is_file() if "error" not in result else False
    if not result["ok"]:
        result["log_tail"] = log_tail(log)
    result["dir"] = str(out)
    return result


def train_argv(a: argparse.Namespace, work: Path, dump: Path, alignment: str, precision: str,
               cache: Path | None, steps: int, checkpoint_interval: int) -> list[str]:
    """A 1-process torchrun of train.py at the fixtures' pipeline."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
            str(ROOT / "train.py"), "--pipeline_dir", str(work / "pipeline"),
            "--teacher_name", str(work / "teacher"), "--align_logits", alignment, "--precision", precision,
            "--device", a.device, "--dump_path", str(dump), "--force", "--max_steps", str(steps),
            "--batch_size", str(a.batch_size), "--gradient_accumulation_steps", "1", "--warmup_prop", "0.1",
            "--learning_rate", "1e-4", "--checkpoint_interval", str(checkpoint_interval),
            "--log_interval", str(max(1, steps // 3)), "--seed", "0"]
    argv += ALIGNMENT_FLAGS.get(alignment, [])
    if cache is not None:
        argv += ["--teacher_cache", str(cache)]
    return argv


def read_log(dump: Path) -> dict:
    """The last training line of train.log: losses, tokens/s, memory (non-finite values kept as strings)."""
    facts: dict = {}
    try:
        lines = (dump / "train.log").read_text(encoding="utf-8").splitlines()
    except OSError:
        return facts
    for line in lines:
        match = STEP_LINE.search(line)
        if match:
            facts = {"step": int(match.group(1))}
            for item in match.group(2).split():
                key, _, value = item.partition("=")
                try:
                    facts[key] = float(value)
                except ValueError:
                    facts[key] = value
    return facts


def train_run(a: argparse.Namespace, work: Path, alignment: str, precision: str, cache: Path | None,
              env: dict[str, str]) -> dict:
    """One training run of the matrix and its verdict."""
    name = f"{alignment}_{precision}_{'cached' if cache else 'online'}"
    dump = work / "runs" / name
    log = work / "logs" / f"{name}.log"
    argv = train_argv(a, work, dump, alignment, precision, cache, a.steps, a.steps)
    result = {"alignment": alignment, "precision": precision, "teacher_cache": cache is not None,
              **run_logged(argv, log, env)}
    summary_path = dump / "train_summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    last = read_log(dump)
    losses = {k: v for k, v in last.items() if k.startswith("loss")}
    result.update(global_step=summary.get("global_step"), train_seconds=summary.get("train_seconds"),
                  losses=losses, tokens_per_s=last.get("tokens_per_s"),
                  memory_mb={k: v for k, v in last.items() if k.endswith("_mb")})
    finite = bool(losses) and all(isinstance(v, float) and math.isfinite(v) for v in losses.values())
    result["ok"] = result["rc"] == 0 and result["global_step"] == a.steps and finite
    if not result["ok"]:
        result["log_tail"] = log_tail(log)
    return result


def final_weights(dump: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(dump / "model.safetensors"))


def max_abs_diff(x: dict, y: dict) -> float:
    if x.keys() != y.keys():
        return math.inf
    return max(float((x[k].double() - y[k].double()).abs().max()) if x[k].numel() else 0.0 for k in x)


def kill_resume(a: argparse.Namespace, work: Path, env: dict[str, str]) -> dict:
    """Two uninterrupted fp16 match runs and one killed after its first checkpoint, then resumed."""
    steps, interval = 2 * a.resume_interval, a.resume_interval
    dumps = {n: work / "runs" / f"resume_{n}" for n in ("first", "second", "killed")}
    logs = {n: work / "logs" / f"resume_{n}.log" for n in dumps}
    argv = {n: train_argv(a, work, d, "match", "fp16", None, steps, interval) for n, d in dumps.items()}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = {n: pool.submit(run_logged, argv[n], logs[n], env,
                                  dumps[n] / "checkpoints" / str(interval) if n == "killed" else None)
                   for n in dumps}
        runs = {n: f.result() for n, f in futures.items()}
    out: dict = {"steps": steps, "checkpoint_interval": interval, "precision": "fp16", "runs": runs}
    if not runs["killed"].get("killed"):
        out.update(ok=False, error="the run to kill ended before its first checkpoint was found",
                   log_tail=log_tail(logs["killed"]))
        return out
    resume_log = work / "logs" / "resume_resumed.log"
    resumed = run_logged([*[x for x in argv["killed"] if x != "--force"], "--load_from_checkpoint",
                          str(dumps["killed"])], resume_log, env)
    out["runs"]["resumed"] = resumed
    bad = [n for n, r in out["runs"].items() if n != "killed" and r.get("rc") != 0]
    if bad:
        out.update(ok=False, error=f"runs failed: {bad}", log_tail=log_tail(logs.get(bad[0], resume_log)))
        return out
    first = final_weights(dumps["first"])
    floor = max_abs_diff(first, final_weights(dumps["second"]))
    diff = max_abs_diff(first, final_weights(dumps["killed"]))
    summary = json.loads((dumps["killed"] / "train_summary.json").read_text(encoding="utf-8"))
    resumed_at = re.search(r"resumed at update (\d+)", (dumps["killed"] / "train.log").read_text(encoding="utf-8"))
    out.update(nondeterminism_max_abs_diff=floor, resumed_max_abs_diff=diff, bit_identical=diff == 0.0,
               resumed_from_step=int(resumed_at.group(1)) if resumed_at else None,
               resumed_global_step=summary["global_step"])
    out["ok"] = (summary["global_step"] == steps and diff <= 10 * floor
                 and out["resumed_from_step"] is not None and out["resumed_from_step"] < steps)
    if out["resumed_from_step"] is not None and out["resumed_from_step"] >= steps:
        out["error"] = "the run was killed after its last update (nothing left to resume); raise --resume_interval"
    return out


def benchmark(a: argparse.Namespace, work: Path, env: dict[str, str]) -> dict:
    """bench/real_scale.py --quick on the device at the size; its JSON embedded."""
    out = work / "real_scale.json"
    argv = [sys.executable, "bench/real_scale.py", "--quick", "--device", a.device, "--sizes", a.size,
            "--configs", a.bench_configs, "--precision", "fp32", "bf16", "--json", str(out),
            "--work_dir", str(work / "bench")]
    if a.corpus:
        argv += ["--corpus", a.corpus]
    if a.lines:
        argv += ["--lines", str(a.lines)]
    if a.device == "cpu":
        argv.append("--emulated_bf16")
    log = work / "logs" / "real_scale.log"
    result = run_logged(argv, log, env)
    result["ok"] = result["rc"] == 0 and out.is_file()
    if out.is_file():
        data = json.loads(out.read_text(encoding="utf-8"))
        result.update(results=data["results"], gemm_peak=data["gemm_peak"], markdown=data["markdown"])
    if not result["ok"]:
        result["log_tail"] = log_tail(log)
    return result


# ------------------------------------------------------------------------------------------ report


def table(training: list[dict]) -> str:
    from bench._common import markdown_table

    rows = [[r["alignment"], r["precision"], "cache" if r["teacher_cache"] else "online",
             "PASS" if r["ok"] else "FAIL", r.get("global_step"),
             f"{r['tokens_per_s']:,.0f}" if isinstance(r.get("tokens_per_s"), float) else "-",
             f"{r['memory_mb'].get('cuda_max_allocated_mb', r['memory_mb'].get('rss_mb', 0)):,.0f}"
             if r.get("memory_mb") else "-",
             " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["losses"].items()),
             r["seconds"]] for r in training]
    return markdown_table(["alignment", "precision", "teacher", "check", "updates", "student tok/s", "peak MiB",
                           "last losses", "wall s"], rows, "llllrrrlr")


def markdown(report: dict) -> str:
    """The report's table, the kill-and-resume verdict and the stages (bench/collect.py shows it)."""
    parts = []
    env = report.get("environment", {})
    if env.get("device_name"):
        parts.append(f"{env['device_name']}, torch {env['torch']}, CUDA {env['cuda_runtime']}, nccl {env.get('nccl')}")
    if report.get("training"):
        parts.append(table(report["training"]))
    if "kill_resume" in report:
        kr = report["kill_resume"]
        parts.append(f"kill and resume (fp16 match): {'PASS' if kr['ok'] else 'FAIL'}; killed after update "
                     f"{kr.get('resumed_from_step')}, resumed vs uninterrupted max |diff| "
                     f"{kr.get('resumed_max_abs_diff')}, two uninterrupted runs {kr.get('nondeterminism_max_abs_diff')}")
    if report.get("benchmark", {}).get("markdown"):
        parts.append(report["benchmark"]["markdown"])
    parts.append("stages: " + ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in report["stages"].items()))
    return "\n\n".join(parts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pins", action="store_true", help="print the pins of GPU_PACKAGES and exit")
    p.add_argument("--missing_pins", action="store_true",
                   help="print the GPU_PACKAGES pins this interpreter lacks or has at another version, and exit")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_check.json"), help="the JSON report")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda (the check); cpu rehearses every stage with gloo")
    p.add_argument("--size", choices=("real", "tiny"), default="real", help="bench/real_scale.py's sizes")
    p.add_argument("--corpus", help="one text per line (default: the demo corpus at the real size, "
                                    "runs/cache/corpus/ru_sentences.txt; a synthetic one at the tiny size)")
    p.add_argument("--lines", type=int, help="corpus lines given to the pipeline (default: real_scale's)")
    p.add_argument("--steps", type=int, default=30, help="updates of each training run")
    p.add_argument("--batch_size", type=int, default=16, help="sequences per update")
    p.add_argument("--resume_interval", type=int, default=10,
                   help="checkpoint interval of the kill-and-resume runs (they train twice as many updates)")
    p.add_argument("--jobs", type=int, help="training runs at a time (default: 4 on cuda, 2 on cpu)")
    p.add_argument("--alignments", default=",".join(ALIGNMENTS), help="comma-separated, from " + ",".join(ALIGNMENTS))
    p.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated, from " + ",".join(PRECISIONS))
    p.add_argument("--bench_configs", default="mlm,match,match/mined,reduce,reduce_map/sparse,reduce_map/my_index,"
                   "match+mse,match+contrastive,match+hyperbolic,uld,dskd", help="bench/real_scale.py --configs")
    p.add_argument("--work_dir", help="fixtures, caches, runs and logs (default: a temporary directory)")
    return p


def check_args(a: argparse.Namespace) -> None:
    a.jobs = a.jobs or (4 if a.device == "cuda" else 2)
    for what, chosen, allowed in (("alignments", a.alignments, ALIGNMENTS), ("precisions", a.precisions, PRECISIONS)):
        items = [x for x in chosen.split(",") if x]
        if not items or any(x not in allowed for x in items):
            raise CheckError(f"--{what} {chosen}: choose a comma-separated subset of {','.join(allowed)}")
        setattr(a, what, items)
    if min(a.steps, a.batch_size, a.resume_interval, a.jobs) < 1:
        raise CheckError("--steps, --batch_size, --resume_interval and --jobs must be at least 1")
    if a.corpus and not Path(a.corpus).is_file():
        raise CheckError(f"--corpus {a.corpus} does not exist; pass a text file with one text per line")


def run_checks(a: argparse.Namespace, work: Path) -> dict:
    from bench._common import machine_info, run_isolated

    (work / "logs").mkdir(parents=True, exist_ok=True)
    env = _subprocess_env(a)
    report: dict = {"params": {k: v for k, v in vars(a).items() if k not in ("pins", "missing_pins")},
                    "stages": {}}
    t0 = time.perf_counter()
    report["environment"] = run_isolated(_run_environment, {}, "spawn")
    if a.device == "cuda" and not report["environment"].get("cuda_available"):
        report["stages"]["environment"] = False
        report["error"] = "no CUDA device visible to torch; run on a GPU machine or pass --device cpu"
        return report
    report["stages"]["environment"] = "error" not in report["environment"]
    fixtures = prepare_fixtures(a, work)
    report["fixtures"] = fixtures
    report["stages"]["fixtures"] = "error" not in fixtures
    print(f"fixtures: {fixtures.get('error', 'done')} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
          flush=True)
    if "error" in fixtures:
        return report
    from kdcore.alignments import cacheable_alignments

    with concurrent.futures.ThreadPoolExecutor(a.jobs) as pool:
        cacheable = [al for al in a.alignments if al in cacheable_alignments()]
        caches = list(pool.map(lambda al: build_cache(a, work, al, env), cacheable))
        report["teacher_cache"] = caches
        report["stages"]["teacher_cache"] = all(c["ok"] for c in caches)
        print(f"teacher caches: {[c['ok'] for c in caches]} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
              flush=True)
        cache_dir = {c["alignment"]: Path(c["dir"]) if c["ok"] else None for c in caches}
        jobs = [(al, p, cache) for al in a.alignments for p in a.precisions
                for cache in ([None, cache_dir[al]] if cache_dir.get(al) else [None])]
        training = list(pool.map(lambda job: train_run(a, work, *job, env), jobs))
    missing = [al for al, c in cache_dir.items() if c is None]
    report["training"] = training
    report["stages"]["training"] = all(r["ok"] for r in training) and not missing
    print(f"training: {sum(r['ok'] for r in training)}/{len(training)} passed ({time.perf_counter() - t0:.0f} s)",
          file=sys.stderr, flush=True)
    report["kill_resume"] = kill_resume(a, work, env)
    report["stages"]["kill_resume"] = report["kill_resume"]["ok"]
    print(f"kill and resume: {report['kill_resume']['ok']} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
          flush=True)
    report["benchmark"] = benchmark(a, work, env)
    report["stages"]["benchmark"] = report["benchmark"]["ok"]
    report["machine"] = machine_info(device=a.device)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.pins or a.missing_pins:
        for line in [f"{n}=={v}" for n, v in pins().items()] if a.pins else missing_pins():
            print(line)
        return 0
    check_args(a)
    from bench._common import script_environment, write_json

    script_environment()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(a.work_dir) if a.work_dir else Path(tmp)
        report = run_checks(a, work)
    report["ok"] = bool(report["stages"]) and all(report["stages"].values())
    report["markdown"] = markdown(report)
    out = write_json(a.out, report)
    print(report["markdown"])
    if report.get("error"):
        print(f"error: {report['error']}", file=sys.stderr)
    print(f"written to {out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CheckError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
