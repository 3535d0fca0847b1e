"""The demo's building blocks: evaluation (whole-word masked prediction against hand-computed numbers and an
independent per-word loop), the paired bootstrap and its verdicts, the method table, topic task, TensorBoard
reading, report keys, stage failures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from demo_eval import (
    mask_positions,
    mlm_accuracy,
    model_size,
    select_words,
    speed,
    whole_word_scores,
    word_piece_positions,
    word_spans,
)
from demo_report import read_scalars, write_report
from demo_stats import paired_bootstrap_ci, verdict


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


def test_word_spans_are_punctuation_stripped_letter_words():
    sentence = "Мама, мыла (раму) кто-то 42 раз."
    assert word_spans(sentence) == [(0, 4), (6, 10), (12, 16), (28, 31)]
    assert [sentence[a:b] for a, b in word_spans(sentence)] == ["Мама", "мыла", "раму", "раз"]


def test_select_words_one_per_short_sentence_fixed_by_seed():
    sentences = ["один два три", "x" * 50, "42 ...", "четыре пять"]
    words = select_words(sentences, max_chars=20, seed=1)
    assert [i for i, _, _ in words] == [0, 3]  # too long; no letters-only word
    assert all((a, b) in word_spans(sentences[i]) for i, a, b in words)
    assert words == select_words(sentences, max_chars=20, seed=1)


def test_word_piece_positions():
    offsets = [(0, 0), (0, 2), (2, 4), (5, 9), (9, 10), (0, 0)]
    assert word_piece_positions(offsets, 0, 4) == [1, 2]
    assert word_piece_positions(offsets, 5, 9) == [3]
    with pytest.raises(ValueError, match="straddles"):
        word_piece_positions(offsets, 0, 3)
    with pytest.raises(ValueError, match="no token"):
        word_piece_positions(offsets, 4, 5)


def tiny_tokenizer():
    """A WordPiece tokenizer of 9 tokens: мыла -> мы ##ла, '.' -> [UNK]."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "мама", "мы", "##ла", "раму"])}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=False)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                           special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


class BiasModel(torch.nn.Module):
    """Logits = `bias` at every position, plus 10 on the input token unless it is [MASK] (4): an unmasked piece
    would be predicted with near certainty."""

    def __init__(self, bias: list[float]):
        super().__init__()
        self.bias = torch.tensor(bias)
        self.config = type("Config", (), {"max_position_embeddings": 16})()

    def forward(self, input_ids, attention_mask=None):
        echo = torch.nn.functional.one_hot(input_ids, len(self.bias)) * (input_ids != 4)[..., None]
        return type("Out", (), {"logits": self.bias + 10.0 * echo})()


def test_whole_word_scores_hand_computed():
    import math

    tok = tiny_tokenizer()
    sentence = "мама мыла раму."
    enc = tok(sentence, return_offsets_mapping=True)
    assert tok.convert_ids_to_tokens(enc["input_ids"]) == ["[CLS]", "мама", "мы", "##ла", "раму", "[UNK]", "[SEP]"]
    # p(мама) = 4/13, p(мы) = 2/13, every other token 1/13 (9 tokens: 4 + 2 + 7)
    model = BiasModel([0, 0, 0, 0, 0, math.log(4), math.log(2), 0, 0])
    words = [(0, 0, 4), (0, 5, 9), (0, 10, 14)]  # мама (right), мы ##ла (мы right, ##ла wrong), раму (wrong)
    result = whole_word_scores(model, tok, [sentence], words, batch_size=2)
    assert result["n_words"] == 3 and result["word_pieces"] == pytest.approx(4 / 3)
    assert result["word_acc"] == pytest.approx(1 / 3)
    assert result["word_pll"] == pytest.approx((math.log(4 / 13) + math.log(2 / 13) + 2 * math.log(1 / 13)) / 3)
    unk_word = whole_word_scores(BiasModel([0, 5, 0, 0, 0, 0, 0, 0, 0]), tok, ["мама ой"], [(0, 5, 7)])
    assert unk_word["word_acc"] == 0.0  # the arg-max is the word's only piece, but that piece is [UNK]


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_whole_word_scores_match_a_per_word_loop(pipeline_out, teacher_dir, which):
    from kdcore.model_io import load_student
    from kdcore.tokenizer_utils import load_tokenizer

    model_dir = pipeline_out / "student_init" if which == "student" else teacher_dir
    tok, model = load_tokenizer(model_dir), load_student(model_dir, model_dir).eval()
    sentences = ["мама мыла раму и пела песню", "кот спит.", "это очень длинное предложение о погоде и море"]
    words = [*select_words(sentences, max_chars=60, seed=0), (2, 4, 9), (0, 10, 14)]
    result = whole_word_scores(model, tok, sentences, words, batch_size=2)
    pll, right = [], []
    for i, start, end in words:  # one sequence at a time, pieces from char_to_token
        enc = tok(sentences[i])
        pieces = sorted({enc.char_to_token(c) for c in range(start, end)})
        ids = torch.tensor([enc["input_ids"]])
        ids[0, pieces] = tok.mask_token_id
        with torch.no_grad():
            log_p = torch.log_softmax(model(input_ids=ids).logits[0, pieces], -1)
        target = torch.tensor(enc["input_ids"])[pieces]
        pll.append(float(log_p[torch.arange(len(pieces)), target].sum()))
        right.append(bool((log_p.argmax(-1) == target).all()) and tok.unk_token_id not in target.tolist())
    assert result["word_pll"] == pytest.approx(sum(pll) / len(pll), rel=1e-5)
    assert result["word_acc"] == pytest.approx(sum(right) / len(right))


def test_paired_bootstrap_ci():
    assert paired_bootstrap_ci([0.5, 0.6, 0.7], [0.4, 0.5, 0.6]) == pytest.approx((0.1, 0.1))
    # two seeds, differences 0 and 1: the resampled mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4
    assert paired_bootstrap_ci([0.0, 1.0], [0.0, 0.0]) == (0.0, 1.0)
    low, high = paired_bootstrap_ci([0.41, 0.43, 0.40, 0.44, 0.42], [0.40, 0.40, 0.41, 0.40, 0.39])
    assert 0.0 < low < 0.024 < high < 0.04  # mean difference 0.02, one seed negative
    assert paired_bootstrap_ci([1, 2, 3], [0, 0, 0], seed=5) == paired_bootstrap_ci([1, 2, 3], [0, 0, 0], seed=5)
    with pytest.raises(ValueError, match="paired"):
        paired_bootstrap_ci([0.1, 0.2], [0.1])


def test_verdicts():
    base = [0.40, 0.41, 0.39, 0.40, 0.42]
    assert verdict(paired_bootstrap_ci([b + 0.02 for b in base], base), 5) == "better"
    assert verdict(paired_bootstrap_ci([b - 0.02 for b in base], base), 5) == "worse"
    noisy = [b + d for b, d in zip(base, (0.03, -0.03, 0.02, -0.02, 0.0))]
    assert verdict(paired_bootstrap_ci(noisy, base), 5) == "no difference at 95%"
    assert verdict(paired_bootstrap_ci([0.5, 0.52], [0.4, 0.41]), 2) == "better (weak: 2 seeds)"
    assert verdict(None, 1) == "not measured"


def test_method_table_and_train_flags(tmp_path):
    import demo
    from kdcore.alignments import cacheable_alignments, selectable_alignments

    runs = demo.runs()
    assert list(runs)[:2] == ["baseline", "random_init"] and runs["match_online"] == ("match", False)
    assert {"match", "reduce", "reduce_map", "uld", "dskd", "match_mined"} <= set(runs)
    for name, method in demo.METHODS.items():
        if method.kd:
            align = method.align[method.align.index("--align_logits") + 1]
            assert align in selectable_alignments()
            assert method.cacheable == (align in cacheable_alignments()), name
    d = make_demo(tmp_path)
    d.teacher_dir = tmp_path / "teacher"
    flags = {run: [str(f) for f in d.train_flags(run)] for run in runs}
    assert flags["baseline"] == ["--alpha_mlm", "1.0"]
    assert flags["random_init"] == ["--student_pretrained_weights", str(d.out / "student_random"), "--alpha_mlm", "1.0"]
    assert flags["match"][-2:] == ["--teacher_cache", str(d.out / "teacher_cache" / "match")]
    assert "--teacher_cache" not in flags["match_online"] and "--teacher_cache" not in flags["uld"]
    assert flags["match_mined"][-1] == str(d.out / "teacher_cache" / "match_mined")
    assert "--column_map" in flags["match_mined"] and flags["uld"][8:10] == ["--align_logits", "uld"]


def fake_models(seeds: dict[str, list[float]]) -> dict[str, dict]:
    """Per-model metrics with the given topic accuracies per seed (teacher 10x the students' parameters)."""
    import statistics

    return {name: {"params": 1000 if name == "teacher" else 100, "size_mb": 1.0, "vocab_size": 100,
                   "latency_ms": 1.0, "throughput_seq_s": 10.0 if name == "teacher" else 40.0, "mlm_acc": 0.3,
                   "word_acc": 0.2 + 0.01 * i, "word_pll": -9.0 + i, "topic_acc": statistics.fmean(accs),
                   "topic_acc_std": statistics.pstdev(accs), "topic_acc_seeds": accs}
            for i, (name, accs) in enumerate(seeds.items())}


def test_report_keys_verdicts_and_files(tmp_path):
    base = [0.40, 0.41, 0.39, 0.40, 0.42]
    seeds = {"teacher": [0.5] * 5, "student_baseline": base, "student_random_init": [b - 0.05 for b in base],
             "student_match": [b + 0.02 for b in base], "student_uld": [b + d for b, d in zip(base, (0.03, -0.03, 0, 0.01, -0.01))],
             "student_match_online": [b + 0.03 for b in base]}
    labels = {name: name.replace("_", " ") for name in seeds}
    curves = {"student match": {"train/loss_mlm": [(1, 3.0), (2, 2.0)], "train/loss": [(1, 5.0), (2, 4.0)]}}
    context = {"mode": "test", "total_minutes": 12.5, "stage_seconds": {"corpus": 1.0},
               "facts": {"heldout_words": 900, "train_seconds": {"match": 30.0, "match_online": 90.0},
                         "teacher_cache": {"match": {"build_seconds": 12.0, "rows": 1234, "bytes_per_row": 36}}}}
    write_report(tmp_path, fake_models(seeds), labels, curves, {"train/loss_mlm": [(1, 9.0), (2, 8.0)]}, context)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["compression"] == pytest.approx(10.0) and saved["speedup"] == pytest.approx(4.0)
    assert saved["minutes"] == pytest.approx(12.5)
    models = saved["models"]
    assert list(models) == list(seeds)
    for name, r in models.items():
        assert set(r) >= {"params", "size_mb", "vocab_size", "latency_ms", "throughput_seq_s", "mlm_acc", "word_acc",
                          "word_pll", "topic_acc", "topic_acc_std", "topic_acc_seeds"}
        if name.startswith("student_"):
            assert len(r["topic_diff_ci"]) == 2 and isinstance(r["verdict"], str)
    assert [models[n]["verdict"] for n in seeds if n != "teacher"] == [
        "reference", "worse", "better", "no difference at 95%", "better"]
    assert models["student_match"]["topic_diff_ci"] == pytest.approx([0.02, 0.02])
    text = (tmp_path / "report.md").read_text()
    assert "| student match | 100 |" in text and "+0.020 [+0.020, +0.020] | better |" in text
    assert "**better**: student match, student match online" in text and "**worse**: student random init" in text
    assert "cache built once in 12 s (1,234 rows, 36 bytes per row)" in text and "training 30 s vs 90 s" in text
    assert "10,000 resamples" in text and "verdicts are weak" not in text
    assert (tmp_path / "losses.png").stat().st_size > 1000 and (tmp_path / "comparison.png").stat().st_size > 1000


def test_report_with_one_seed_says_not_measured(tmp_path):
    seeds = {"teacher": [0.5], "student_baseline": [0.4], "student_match": [0.45]}
    report = write_report(tmp_path, fake_models(seeds), {n: n for n in seeds}, {}, {}, {"mode": "test"})
    assert report["models"]["student_match"]["verdict"] == "not measured"
    assert report["models"]["student_match"]["topic_diff_ci"] is None
    assert "the topic verdicts are weak**: 1 fine-tuning seed(s), fewer than 5 (one seed measures no spread" in \
        (tmp_path / "report.md").read_text()


def test_demo_topics_runs_every_seed_as_a_run_of_its_own(tmp_path):
    from transformers import BertConfig

    import demo_topics
    from kdcore.errors import UserError
    from kdcore.tokenizer_utils import load_tokenizer
    from test_glue_data import make_tokenizer, write_glue_task

    tok = make_tokenizer(tmp_path / "tok")
    BertConfig(vocab_size=len(load_tokenizer(tok)), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=32, max_position_embeddings=64).save_pretrained(str(tmp_path / "bert"))
    data = write_glue_task(tmp_path / "topics", "single_sentence", n_train=32, n_dev=16)

    def argv(seed: int, dump: str) -> list[str]:
        return ["--glue_dataset", "single_sentence", "--glue_dir", str(data), "--num_labels", "4", "--tokenizer_name",
                str(tok), "--dumps_dir", str(tmp_path / dump), "--batch_size", "8", "--lr", "1e-3", "--device", "cpu",
                "--seed", str(seed), "train_single", "--model_name", str(tmp_path / "bert"), "--n_epochs", "1"]

    (tmp_path / "argv.json").write_text(json.dumps([argv(0, "seed0"), argv(1, "seed1")]))
    assert demo_topics.main([str(tmp_path / "argv.json")]) == 0
    assert demo_topics.glue_main(argv(0, "alone")) == 0  # distil-finetuned-en/train.py's own entry point

    def results(dump: str) -> dict:
        saved = json.loads((tmp_path / dump / "results.json").read_text())
        return {"dev": saved["dev"], "train": saved["train"]}

    assert results("seed0") == results("alone") and (tmp_path / "seed1" / "results.json").is_file()
    with pytest.raises(UserError, match="usage"):
        demo_topics.main([])
