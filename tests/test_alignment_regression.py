"""Every alignment trains as it did before the issue-12 redesign: 10 updates (fp32, CPU, fixed seed) give the
losses, validation losses and weights recorded from the old trainer in `golden/alignment_runs.json` (its `_about`
names the commit; each run keeps the old command line as `argv`)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
from safetensors.torch import load_file

from test_train import run_train, train_argv

GOLDEN = json.loads((Path(__file__).with_name("golden") / "alignment_runs.json").read_text())["runs"]
RTOL = 1e-4
"""Relative tolerance: loose enough for another CPU's kernels, far below what a behaviour change moves."""


def flags(name: str, out: Path, teacher: Path) -> list[str]:
    """The command line of run `name` in today's trainer."""
    kd = ["--teacher_name", str(teacher), "--alpha_ce", "2.0", "--alpha_mlm", "0.5", "--temperature", "2"]
    match = [*kd, "--align_logits", "match", "--matching_ids", str(out / "matched_vocab.json")]
    reduce = [*kd, "--align_logits", "reduce", "--t2s_mapping", str(out / "teacher2student.json"),
              "--matching_ids", str(out / "matched_vocab.json")]
    reduce_map = [*kd, "--align_logits", "reduce_map", "--t2s_mapping", str(out / "teacher2student.json"),
                  "--t2s_vocab_padded", str(out / "t2s_padded.npy"), "--t2s_mapped_ids", str(out / "t2s_mapped_ids.npy")]
    return {
        "mlm_only": ["--alpha_mlm", "1.0"],
        "match": match,
        "reduce": reduce,
        "reduce_map": reduce_map,
        "reduce_map_my_index": [*reduce_map, "--reduce_map_impl", "my_index", "--s2t_vocab_padded",
                                str(out / "s2t_padded.npy"), "--s2t_idxs_padded", str(out / "s2t_idxs_padded.npy"),
                                "--sum_probs"],
        "shared": ["--teacher_name", str(teacher), "--alpha_ce", "2.0", "--alpha_mlm", "0.5"],
        "match_mse_cos": [*match, "--alpha_mse", "1.0", "--alpha_cos", "1.0"],
        "reduce_contrastive": [*reduce, "--alpha_contrastive", "1.0", "--align_hiddens", "reduce",
                               "--n_negative_samples", "4"],
        "match_hyperbolic": [*match, "--alpha_contrastive", "1.0", "--n_negative_samples", "4", "hyperbolic", "--c",
                             "0.5"],
    }[name]


def tensorboard_scalars(run_dir: Path) -> dict[str, dict[str, float]]:
    """{tag: {step: value}} from the TensorBoard event files (TFRecord framing: length, crc, event, crc)."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, dict[str, float]] = {}
    for path in sorted(run_dir.iterdir()):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                if not (value.tag.startswith("memory/") or value.tag.endswith("tokens_per_s")):
                    scalars.setdefault(value.tag, {})[str(event.step)] = value.simple_value
    return scalars


def weight_stats(path: Path) -> dict[str, list[float]]:
    """{name: [sum, sum of |w|, sum of w^2]} of a safetensors file, in float64."""
    return {name: [float(t.double().sum()), float(t.double().abs().sum()), float(t.double().pow(2).sum())]
            for name, t in sorted(load_file(str(path)).items())}


ROUNDING_NOISE = ("attention.k_lin.bias", "attention.self.key.bias")
"""Parameters compared by name only: the attention's key bias adds q . b to every key of a query alike, which the
softmax over the keys cancels, so its gradient is 0 in exact arithmetic. What it gets is rounding noise, which
Adam scales up to steps of about the learning rate: any change in the order of a sum (e.g. adding two loss
gradients in fp32 before a cast instead of after) moves it by that much."""


def assert_stats_close(got: dict[str, list[float]], want: dict[str, list[float]], what: str) -> None:
    assert got.keys() == want.keys(), what
    for name, (total, absolute, square) in want.items():
        if name.endswith(ROUNDING_NOISE):
            continue
        g_total, g_abs, g_square = got[name]
        assert math.isclose(g_total, total, rel_tol=RTOL, abs_tol=RTOL * absolute + 1e-9), (what, name)
        assert math.isclose(g_abs, absolute, rel_tol=RTOL, abs_tol=1e-9), (what, name)
        assert math.isclose(g_square, square, rel_tol=RTOL, abs_tol=1e-12), (what, name)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_ten_updates_reproduce_the_recorded_run(tmp_path, golden, name):
    out = golden["out_same"] if name == "shared" else golden["out"]
    extra = flags(name, out, golden["teacher"])
    tail = extra.index("hyperbolic") if "hyperbolic" in extra else len(extra)
    dump = tmp_path / "dump"
    argv = train_argv(out, dump, "--max_steps", "10", "--log_interval", "1", "--checkpoint_interval", "5",
                      *extra[:tail]) + extra[tail:]
    assert run_train(argv) == 0
    want = GOLDEN[name]
    got = tensorboard_scalars(dump / "tensorboard" / "run")
    assert set(got.pop("train/nonfinite_skipped").values()) == {0.0}  # logged since the recording; nothing skipped
    assert got.keys() == want["scalars"].keys()
    for tag, values in want["scalars"].items():
        assert got[tag].keys() == values.keys(), tag
        for step, value in values.items():
            assert math.isclose(got[tag][step], value, rel_tol=RTOL, abs_tol=1e-7), (tag, step, got[tag][step], value)
    summary = json.loads((dump / "train_summary.json").read_text())
    assert [h["valid_loss"] for h in summary["history"]] == pytest.approx(want["valid"], rel=RTOL)
    assert_stats_close(weight_stats(dump / "model.safetensors"), want["student"], "exported student")
    assert_stats_close(weight_stats(dump / "checkpoints" / "10" / "model.safetensors"), want["runner"],
                       "checkpointed runner")
