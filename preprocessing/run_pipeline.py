"""Run the ten preprocessing steps in dependency order, skipping those whose outputs are up to date.

    python preprocessing/run_pipeline.py --teacher_name TEACHER_DIR --corpus FILE [FILE ...] \\
        (--student_vocab_size N | --student_tokenizer DIR) --student_config DISTILBERT_CONFIG.json --out_dir OUT

Order (the step numbers): 1 train_reduced_tok, 2 teacher_tokens_split, 3 encode_shards, 4 prepare_lm_seqs,
5 regroup_binarized, 6 token_counts, 7 student2teacher (needs the teacher counts), 8 init_weights,
9 find_matching_ids, 10 matched_vocab, with `--cache_teacher ALIGN` 11 cache_teacher (the teacher-output cache
in OUT/teacher_cache), and 12 mined_vocab (the MinED column map of `--column_map mined`; after step 11 so that the
older steps keep their numbers). `OUT/manifest.json` records every step's parameters, inputs,
statistics and a run id; a step is skipped when its signature (its parameters, the fingerprints of its
external inputs and the run ids of the steps it reads) is unchanged and its outputs exist. `--force`
redoes every step. An `OUT` built from another teacher tokenizer is refused without `--force`.

Killed at any point (even SIGKILL), the same command resumes: every output is published by a rename once complete
and a step's manifest entry is written only after all its outputs, so finished steps are skipped, the interrupted
one is redone and the temp files of the killed process are deleted. Every step is deterministic and a run id is a
hash of the step's signature and outputs, so the resumed `OUT` is byte-identical to a clean run's (the manifest's
`seconds` fields aside).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import _bootstrap  # noqa: F401
import cache_teacher
import encode_shards
import find_matching_ids
import init_weights
import matched_vocab
import mined_vocab
import prepare_lm_seqs
import regroup_binarized
import student2teacher
import teacher_tokens_split
import token_counts
import train_reduced_tok
from common import DEFAULT_MAX_BAD_FRAC
from kdcore.alignments import cacheable_alignments
from kdcore.artifacts import MANIFEST, read_manifest
from kdcore.errors import UserError, run_cli
from kdcore.fsutil import atomic_write_json, is_stale_temp, remove_stale_temps
from kdcore.model_io import check_teacher
from kdcore.shard_io import read_index
from kdcore.teacher_cache import HEADER as CACHE_HEADER
from kdcore.tokenizer_utils import MAX_LEN, fingerprint, load_tokenizer, vocab_list

FORMAT = "rvkd-pipeline/1"
CACHE_DIR = "teacher_cache"
"""Where `--cache_teacher` puts the teacher-output cache (step 11) in OUT."""


@dataclass
class Step:
    """One pipeline step: what it reads, what it writes, how to run it."""

    number: int
    name: str
    deps: tuple[str, ...]
    params: tuple[str, ...]
    external: tuple[str, ...]
    outputs: Callable[[Path], list[Path]]
    run: Callable[[argparse.Namespace, Path], dict]
    complete: Callable[[Path], bool] | None = None
    enabled: Callable[[argparse.Namespace], bool] | None = None  # None: always; else run only when it says so


def _has_match(out: Path) -> bool:
    index_path = out / "processed_binarized" / "index.json"
    if not index_path.is_file():
        return False
    index = read_index(out / "processed_binarized")
    return all(json.loads((out / "processed_binarized" / s["name"] / "shard.json").read_text())["has_match"]
               for s in index["shards"])


def _student_dir(out: Path) -> str:
    return str(out / "student")


def _student_tokenizer(a: argparse.Namespace, out: Path) -> dict:
    """Step 1: train the reduced vocabulary, or adopt the tokenizer given by --student_tokenizer."""
    if a.student_tokenizer:
        return train_reduced_tok.adopt(a.teacher_name, a.student_tokenizer, str(out / "student"), a.student_config,
                                       a.max_len, force=True)
    return train_reduced_tok.train(train_reduced_tok.ReducedTokParams(
        teacher_name=a.teacher_name, corpus=a.corpus, vocab_size=a.student_vocab_size,
        out=str(out / "student"), char_coverage=a.char_coverage, min_frequency=a.min_frequency,
        student_config_path=a.student_config, max_len=a.max_len, max_bad_frac=a.max_bad_frac, force=True,
    ))


def _teacher_cache(a: argparse.Namespace, out: Path) -> dict:
    """Step 11: build (or complete) the teacher-output cache; statistics of the cache, not of this run's share of
    the work (a resumed build skips the shards it already published)."""
    stats = cache_teacher.build(cache_teacher.CacheParams(
        pipeline_dir=str(out), teacher_name=a.teacher_name, align_logits=a.cache_teacher, out=str(out / CACHE_DIR),
        temperature=a.cache_temperature, encoding=a.cache_format, k=a.cache_k, dtype=a.cache_dtype,
        precision=a.cache_precision, batch_size=a.cache_batch_size, seed=a.seed), log=lambda *_: None)
    header = json.loads((out / CACHE_DIR / CACHE_HEADER).read_text(encoding="utf-8"))
    return {"shards": len(header["shards"]), "rows": sum(s["n_rows"] for s in header["shards"]),
            "bytes_per_row": header["bytes_per_row"], "seconds": stats["seconds"]}


STEPS = [
    Step(1, "train_reduced_tok", (), ("student_vocab_size", "char_coverage", "min_frequency", "max_len"),
         ("teacher_tokenizer", "corpus", "student_config", "student_tokenizer"),
         lambda o: [o / "student" / "tokenizer.json"], _student_tokenizer),
    Step(2, "teacher_tokens_split", ("train_reduced_tok",), (), ("teacher_tokenizer",),
         lambda o: [o / n for n in teacher_tokens_split.OUTPUTS],
         lambda a, o: teacher_tokens_split.run(a.teacher_name, _student_dir(o), str(o))),
    Step(3, "encode_shards", ("train_reduced_tok", "teacher_tokens_split"), (), ("teacher_tokenizer", "corpus"),
         lambda o: [o / "work" / "encoded" / "index.json"],
         lambda a, o: encode_shards.run(encode_shards.EncodeParams(
             teacher_name=a.teacher_name, student_name=_student_dir(o), corpus=a.corpus,
             t2s_padded=str(o / "t2s_padded.npy"), out_dir=str(o / "work" / "encoded"),
             num_workers=a.num_workers, max_bad_frac=a.max_bad_frac, force=True,
         ))),
    Step(4, "prepare_lm_seqs", ("encode_shards",), ("max_len", "min_len", "max_unk_prop"), ("teacher_tokenizer",),
         lambda o: [o / "work" / "filtered" / "index.json"],
         lambda a, o: prepare_lm_seqs.run(prepare_lm_seqs.FilterParams(
             teacher_name=a.teacher_name, student_name=_student_dir(o), in_dir=str(o / "work" / "encoded"),
             t2s_padded=str(o / "t2s_padded.npy"), out_dir=str(o / "work" / "filtered"), max_len=a.max_len,
             min_len=a.min_len, max_unk_prop=a.max_unk_prop, force=True,
         ))),
    Step(5, "regroup_binarized", ("prepare_lm_seqs",), ("n_shards",), (),
         lambda o: [o / "processed_binarized" / "index.json"],
         lambda a, o: regroup_binarized.run(str(o / "work" / "filtered"), str(o / "processed_binarized"),
                                            a.n_shards, force=True)),
    Step(6, "token_counts", ("regroup_binarized",), (), (), lambda o: [o / n for n in token_counts.OUTPUTS],
         lambda a, o: token_counts.run(str(o / "processed_binarized"), str(o))),
    Step(7, "student2teacher", ("teacher_tokens_split", "token_counts"), ("cut_len", "seed"), (),
         lambda o: [o / n for n in student2teacher.OUTPUTS],
         lambda a, o: student2teacher.run(student2teacher.InverseMapParams(
             t2s_mapping=str(o / "teacher2student.json"), t2s_padded=str(o / "t2s_padded.npy"),
             t2s_mapped_ids=str(o / "t2s_mapped_ids.npy"), teacher_counts=str(o / "teacher_counts.npy"),
             out_dir=str(o), cut_len=a.cut_len, seed=a.seed,
         ))),
    Step(8, "init_weights", ("train_reduced_tok", "teacher_tokens_split"),
         ("seed", "vocab_transform", "init_strategy", "layers"), ("teacher_tokenizer", "teacher_model"),
         lambda o: [o / "student_init" / "config.json"],
         lambda a, o: init_weights.run(init_weights.InitParams(
             teacher_name=a.teacher_name, student_name=_student_dir(o), out=str(o / "student_init"),
             t2s_mapping=str(o / "teacher2student.json"), vocab_transform=a.vocab_transform == "copy",
             seed=a.seed, force=True, strategy=a.init_strategy, layers=a.layers,
         ))),
    Step(9, "find_matching_ids", ("regroup_binarized",), (), ("teacher_tokenizer",), lambda o: [],
         lambda a, o: find_matching_ids.run(a.teacher_name, _student_dir(o), str(o / "processed_binarized")),
         complete=_has_match),
    Step(10, "matched_vocab", ("train_reduced_tok",), (), ("teacher_tokenizer",),
         lambda o: [o / "matched_vocab.json"],
         lambda a, o: matched_vocab.run(a.teacher_name, _student_dir(o), str(o / "matched_vocab.json"))),
    Step(11, "cache_teacher", ("regroup_binarized", "find_matching_ids", "matched_vocab", "teacher_tokens_split"),
         ("cache_teacher", "cache_temperature", "cache_format", "cache_k", "cache_dtype", "cache_precision", "seed"),
         ("teacher_tokenizer", "teacher_model"), lambda o: [o / CACHE_DIR / "cache.json"],
         _teacher_cache, enabled=lambda a: a.cache_teacher is not None),
    Step(12, "mined_vocab", ("train_reduced_tok",), (), ("teacher_tokenizer",), lambda o: [o / "mined_vocab.json"],
         lambda a, o: mined_vocab.run(mined_vocab.MinedParams(
             teacher_name=a.teacher_name, student_name=_student_dir(o), out=str(o / "mined_vocab.json"),
             workers=a.num_workers,
         ))),
]


def _file_stamp(path: Path) -> list:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def external_fingerprints(a: argparse.Namespace, teacher_tok) -> dict[str, object]:
    """Fingerprints of the inputs from outside OUT: tokenizer content, file sizes and times."""
    teacher_dir = Path(a.teacher_name)
    weights = sorted(p for p in teacher_dir.iterdir() if p.suffix in (".safetensors", ".bin") or p.name == "config.json")
    return {
        "teacher_tokenizer": fingerprint(teacher_tok),
        "teacher_model": [_file_stamp(p) for p in weights],
        "corpus": [_file_stamp(Path(p)) for p in a.corpus],
        "student_config": hashlib.sha256(Path(a.student_config).read_bytes()).hexdigest() if a.student_config else None,
        "student_tokenizer": fingerprint(load_tokenizer(a.student_tokenizer, "student"))
        if a.student_tokenizer else None,
    }


def signature(step: Step, a: argparse.Namespace, external: dict, manifest: dict) -> str:
    """Hash of everything the step's result depends on."""
    payload = {
        "step": step.name,
        "params": {p: getattr(a, p) for p in step.params},
        "external": {e: external[e] for e in step.external},
        "deps": {d: manifest["steps"].get(d, {}).get("run_id") for d in step.deps},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def run_id(sig: str, step: Step, out: Path) -> str:
    """A step run's id: a hash of its signature and of the bytes of its output files, the same for every run that
    computes the same outputs from the same inputs (steps downstream of a redone step are redone only when its
    outputs changed)."""
    digest = hashlib.sha256(sig.encode())
    for path in step.outputs(out):
        digest.update(path.relative_to(out).as_posix().encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:32]


def up_to_date(step: Step, sig: str, manifest: dict, out: Path) -> bool:
    record = manifest["steps"].get(step.name)
    if record is None or record.get("signature") != sig:
        return False
    if not all(p.exists() for p in step.outputs(out)):
        return False
    return step.complete(out) if step.complete else True


def check_out_dir(out: Path, teacher_fp: str, force: bool) -> dict:
    """The manifest to continue from (empty when starting fresh); refuses foreign or mismatched OUT dirs."""
    fresh = {"format": FORMAT, "fingerprints": {"teacher": teacher_fp}, "steps": {}}
    if not out.exists():
        return fresh
    manifest = read_manifest(out)
    if manifest is None:
        if any(not is_stale_temp(p.name) for p in out.iterdir()) and not force:
            raise UserError(f"--out_dir {out} exists and is not a pipeline output (no {MANIFEST}); choose a new "
                            "--out_dir or pass --force")
        return fresh
    if manifest.get("fingerprints", {}).get("teacher") != teacher_fp:
        if not force:
            raise UserError(f"--out_dir {out} was built from another teacher tokenizer; choose a new --out_dir or "
                            "pass --force to rebuild it")
        return fresh
    return fresh if force else manifest


def run(a: argparse.Namespace, log=print) -> dict:
    """Run the pipeline; returns the final manifest."""
    out = Path(a.out_dir)
    if (a.student_vocab_size is None) == (a.student_tokenizer is None):
        raise UserError("pass exactly one of --student_vocab_size (train a reduced vocabulary) and "
                        "--student_tokenizer (use a given one)")
    if a.student_config and not Path(a.student_config).is_file():
        raise UserError(f"--student_config {a.student_config} does not exist; pass a DistilBERT config JSON")
    for path in a.corpus:
        if not Path(path).is_file():
            raise UserError(f"corpus file {path} does not exist; check the --corpus paths")
    teacher_tok = load_tokenizer(a.teacher_name, "teacher")
    check_teacher(a.teacher_name, len(vocab_list(teacher_tok)))
    external = external_fingerprints(a, teacher_tok)
    manifest = check_out_dir(out, external["teacher_tokenizer"], a.force)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return run_steps(a, out, external, manifest, log)
    except BaseException:
        if created and not any(out.iterdir()):
            out.rmdir()
        raise


def run_steps(a: argparse.Namespace, out: Path, external: dict, manifest: dict, log) -> dict:
    """Run every step that is not up to date, recording each one in the manifest once all its outputs exist."""
    removed = remove_stale_temps(out)
    if removed:
        log(f"removed {len(removed)} temp file(s) of a killed run: {', '.join(str(p.relative_to(out)) for p in removed)}")
    manifest["params"] = {k: v for k, v in vars(a).items() if k != "force"}
    total = time.perf_counter()
    for k, step in enumerate(STEPS, 1):
        if step.enabled is not None and not step.enabled(a):
            continue
        sig = signature(step, a, external, manifest)
        label = f"[{k}/{len(STEPS)}] step {step.number} {step.name}"
        if up_to_date(step, sig, manifest, out):
            log(f"{label}: up to date, skipped")
            continue
        start = time.perf_counter()
        stats = step.run(a, out)
        seconds = round(time.perf_counter() - start, 3)
        manifest["steps"][step.name] = {"number": step.number, "signature": sig, "run_id": run_id(sig, step, out),
                                        "seconds": seconds, "stats": stats}
        if step.name == "train_reduced_tok":
            manifest["fingerprints"]["student"] = fingerprint(load_tokenizer(out / "student", "student"))
        atomic_write_json(out / MANIFEST, manifest)
        log(f"{label}: {seconds:.1f} s {json.dumps(stats, ensure_ascii=False)}")
    manifest["seconds_total"] = round(time.perf_counter() - total, 3)
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher_name", required=True, help="teacher directory (HF BertForMaskedLM + tokenizer)")
    p.add_argument("--corpus", nargs="+", required=True, help="UTF-8 text files, one text per line")
    p.add_argument("--student_vocab_size", type=int, help="size of the student vocabulary (to train)")
    p.add_argument("--student_tokenizer",
                   help="use this tokenizer directory for the student instead of training one (e.g. the teacher's "
                        "own, for same-vocabulary distillation); --student_vocab_size is then not needed")
    p.add_argument("--student_config", required=True, help="DistilBERT (or BERT) config JSON of the student")
    p.add_argument("--out_dir", required=True, help="output directory (see README for its contents)")
    p.add_argument("--max_len", type=int, default=MAX_LEN, help="maximum sequence length on every side")
    p.add_argument("--min_len", type=int, default=3, help="minimum content tokens per sequence")
    p.add_argument("--max_unk_prop", type=float, default=0.5, help="largest tolerated share of [UNK]")
    p.add_argument("--n_shards", type=int, default=1, help="number of training processes")
    p.add_argument("--cut_len", type=int, default=30, help="cap of the student->teacher inverse map")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--num_workers", type=int, default=2, help="encoder threads (and the edit-distance threads of step 12)")
    p.add_argument("--char_coverage", type=float, default=0.9995, help="student alphabet coverage")
    p.add_argument("--min_frequency", type=int, default=2, help="minimum merge frequency of the student vocab")
    p.add_argument("--vocab_transform", choices=("copy", "random"), default="copy",
                   help="initialise the student's MLM transform from the teacher's")
    init_weights.add_layer_args(p)
    p.add_argument("--max_bad_frac", type=float, default=DEFAULT_MAX_BAD_FRAC,
                   help="largest tolerated share of undecodable lines per corpus file")
    g = p.add_argument_group("step 11 (optional): the teacher-output cache, in OUT/teacher_cache")
    g.add_argument("--cache_teacher", choices=cacheable_alignments(),
                   help="build the cache for this alignment (see preprocessing/cache_teacher.py)")
    cache_teacher.add_arguments(g, prefix="cache_")
    p.add_argument("--force", action="store_true", help="redo every step (and accept a foreign --out_dir)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    manifest = run(a)
    print(f"done in {manifest['seconds_total']:.1f} s; outputs in {a.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
