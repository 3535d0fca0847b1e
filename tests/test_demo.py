"""The demo's building blocks: evaluation, topic task, TensorBoard reading, report, stage failures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from demo_eval import mask_positions, mlm_accuracy, model_size, speed
from demo_report import MODELS, read_scalars, write_report


def test_mask_positions_cover_content_only():
    lengths = np.array([3, 10, 40])
    picks = mask_positions(lengths, 0.15, np.random.default_rng(0))
    assert [len(p) for p in picks] == [1, 1, 6]
    for n, p in zip(lengths, picks):
        assert p.min() >= 1 and p.max() <= n - 2 and len(set(p.tolist())) == len(p) and (np.diff(p) > 0).all()


def test_mlm_accuracy_matches_a_per_sentence_computation(pipeline_out):
    from kdcore.model_io import load_student
    from kdcore.tokenizer_utils import load_tokenizer

    model_dir = pipeline_out / "student_init"
    sentences = ["мама мыла раму и пела песню", "кот спит", "это очень длинное предложение о погоде и море"]
    result = mlm_accuracy(model_dir, sentences, batch_size=2, seed=3)
    tok, model = load_tokenizer(model_dir), load_student(model_dir, model_dir).eval()
    ids = [tok(s)["input_ids"] for s in sentences]
    picks = mask_positions(np.array([len(x) for x in ids]), 0.15, np.random.default_rng(3))
    correct = total = 0
    for seq, pick in zip(ids, picks):
        masked = torch.tensor([seq])
        masked[0, pick] = tok.mask_token_id
        with torch.no_grad():
            pred = model(input_ids=masked).logits[0, pick].argmax(-1)
        correct += int((pred == torch.tensor(seq)[pick]).sum())
        total += len(pick)
    assert result["n_predictions"] == total
    assert result["mlm_acc"] == pytest.approx(correct / total)


def test_size_and_speed(pipeline_out):
    size = model_size(pipeline_out / "student_init")
    assert size["params"] > 0 and size["size_mb"] > 0 and size["vocab_size"] == 150
    fast = speed(pipeline_out / "student_init", seq_len=16, batch=4, repeats=2, warmup=1)
    assert fast["latency_ms"] > 0 and fast["throughput_seq_s"] > 0 and fast["seq_len"] == 16


def test_read_scalars_round_trip(tmp_path):
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(logdir=str(tmp_path / "run"))
    for step in range(5):
        writer.add_scalar("train/loss", 10.0 - step, step)
    writer.add_scalar("valid/loss", 3.5, 4)
    writer.close()
    scalars = read_scalars(tmp_path)
    assert scalars["train/loss"] == [(s, 10.0 - s) for s in range(5)]
    assert scalars["valid/loss"] == [(4, 3.5)]


def test_report_files(tmp_path):
    models = {name: {"params": p, "size_mb": p / 1e6, "vocab_size": 100, "latency_ms": 1.0 + i,
                     "throughput_seq_s": 100.0 / (i + 1), "mlm_acc": 0.3 + 0.1 * i, "topic_acc": 0.5}
              for i, (name, p) in enumerate(zip(MODELS, (1000, 100, 100, 100)))}
    curves = {"a": {"train/loss_mlm": [(1, 3.0), (2, 2.0)], "valid/loss": [(2, 2.5)]}}
    cache = {"build_seconds": 3.0, "online_epoch_seconds": 40.0, "rows": 1234, "bytes_per_row": 36,
             "encoding": {"name": "sample", "k": 16, "dtype": "fp16"}}
    report = write_report(tmp_path, models, curves, {"mode": "test", "stage_seconds": {"corpus": 1.0},
                                                     "facts": {"teacher_cache": cache}})
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["compression"] == pytest.approx(10.0) and saved["speedup"] == pytest.approx(0.5)
    for name in MODELS:
        assert set(saved[name]) >= {"params", "size_mb", "vocab_size", "latency_ms", "throughput_seq_s", "mlm_acc",
                                    "topic_acc"}
    text = (tmp_path / "report.md").read_text()
    assert "10.0x" in text and "student (distilled)" in text
    assert "teacher cache (sample, K = 16): 1,234 rows, 36 bytes per row, built in 3 s vs 40 s" in text
    assert "student (distilled, teacher cache)" in text
    assert (tmp_path / "losses.png").stat().st_size > 1000 and (tmp_path / "comparison.png").stat().st_size > 1000
    assert report["student_kd"]["mlm_acc"] == pytest.approx(0.4)


def make_demo(tmp_path, *extra: str):
    import demo

    return demo.Demo(demo.build_parser().parse_args(["--quick", "--out", str(tmp_path / "out"), "--cache_dir",
                                                     str(tmp_path / "cache"), *extra]))


def test_topic_task_is_balanced_and_split(tmp_path):
    d = make_demo(tmp_path)
    d.facts = {}
    lines = ["text\ttopic"] + [f"фраза {t} {i}\t{t}" for t in ("love", "war", "art") for i in range(20)]
    lines += [f"редкое {i}\trare" for i in range(3)]
    tsv = tmp_path / "topics.tsv"
    tsv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    d.setup.n_topics, d.setup.topic_max_per_class = 3, 10
    d.write_topic_task(tsv, tmp_path / "task")
    train = (tmp_path / "task" / "train.tsv").read_text(encoding="utf-8").splitlines()
    dev = (tmp_path / "task" / "dev.tsv").read_text(encoding="utf-8").splitlines()
    assert train[0] == dev[0] == "sentence\tlabel"
    assert len(train) - 1 == 24 and len(dev) - 1 == 6
    assert sorted(json.loads((tmp_path / "task" / "labels.json").read_text())) == ["art", "love", "war"]
    assert {line.split("\t")[1] for line in train[1:]} == {"0", "1", "2"}
    assert not set(train[1:]) & set(dev[1:])


def test_a_failing_stage_names_itself_and_its_log(tmp_path):
    import demo

    d = make_demo(tmp_path)
    d.logs.mkdir(parents=True)
    d.stage = "pipeline"
    with pytest.raises(demo.StageFailed, match=r"stage 'pipeline'.*pipeline\.log"):
        d.run_stage("pipeline", lambda: d.sh(d.py, "-c", "import sys; print('boom'); sys.exit(3)"))
    assert "boom" in (d.logs / "pipeline.log").read_text()


def test_topic_accuracy_over_seeds_in_the_report(tmp_path):
    models = {name: {"params": p, "size_mb": 1.0, "vocab_size": 100, "latency_ms": 1.0, "throughput_seq_s": 10.0,
                     "mlm_acc": 0.3, "topic_acc": acc, "topic_acc_std": std, "topic_acc_seeds": [acc - std, acc + std]}
              for name, p, acc, std in zip(MODELS, (1000, 100, 100, 100), (0.5, 0.38, 0.37, 0.36),
                                           (0.01, 0.03, 0.02, 0.01))}
    report = write_report(tmp_path, models, {}, {"mode": "test"})
    text = (tmp_path / "report.md").read_text()
    assert "0.380 ± 0.030" in text and "within the seed spread of 0.030" in text
    assert report["student_kd"]["topic_acc_seeds"] == pytest.approx([0.35, 0.41])


def test_topic_verdict():
    from demo_report import topic_verdict

    assert topic_verdict({"topic_acc": 0.40, "topic_acc_std": 0.01}, {"topic_acc": 0.36, "topic_acc_std": 0.02}) \
        == "better"
    assert topic_verdict({"topic_acc": 0.30, "topic_acc_std": 0.01}, {"topic_acc": 0.36, "topic_acc_std": 0.02}) \
        == "not better"
    assert topic_verdict({"topic_acc": 0.37, "topic_acc_std": 0.0}, {"topic_acc": 0.36, "topic_acc_std": 0.02}) \
        .startswith("within")
    assert topic_verdict({"topic_acc": 0.37}, {"topic_acc": 0.36}) == "better"  # one seed: no spread known
    assert topic_verdict({"topic_acc": None}, {"topic_acc": 0.36}) == "not measured"
