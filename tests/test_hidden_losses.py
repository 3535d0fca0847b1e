"""Hidden-state losses: layer strategies, projections, MSE / cosine, the vectorised contrastive loss against
plain loops, the hyperbolic head, and `HiddenLosses` on constructed batches."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import custom_step
from custom_step import (
    contrastive_loss,
    hidden_cosine_loss,
    hidden_mse_loss,
    info_nce_loss,
    masked_mean_pool,
    sample_without_replacement,
)
from hyptorch import pmath
from kdcore.alignments import MatchPositions, ReducePositions, SharedPositions
from kdcore.hidden_projection import (
    HiddenConfig,
    HiddenLosses,
    HyperbolicConfig,
    HyperbolicHead,
    LayerSelector,
    PairProjector,
    layer_pairs,
    parse_layer_ids,
)


def _pairs(strategy, lt, ls, ids=None):
    """Layer pairs as lists of (teacher states, student states) read off the combination matrices."""
    w_t, w_s = layer_pairs(strategy, lt, ls, ids)
    assert torch.allclose(w_t.sum(1), torch.ones(len(w_t))) and torch.allclose(w_s.sum(1), torch.ones(len(w_s)))
    return [(w_t[p].nonzero().flatten().tolist(), w_s[p].nonzero().flatten().tolist()) for p in range(len(w_t))]


EXPECTED = {
    (12, 3): {
        "last": [([9], [0]), ([10], [1]), ([11], [2]), ([12], [3])],
        "skip": [([0], [0]), ([4], [1]), ([8], [2]), ([12], [3])],
        "average": [([0], [0]), ([1, 2, 3, 4], [1]), ([5, 6, 7, 8], [2]), ([9, 10, 11, 12], [3])],
        "average_by_layers": [(list(range(13)), [0, 1, 2, 3])],
    },
    (4, 3): {
        "last": [([1], [0]), ([2], [1]), ([3], [2]), ([4], [3])],
        "skip": [([0], [0]), ([2], [1]), ([3], [2]), ([4], [3])],
        "average": [([0], [0]), ([1, 2], [1]), ([3], [2]), ([4], [3])],
        "average_by_layers": [([0, 1, 2, 3, 4], [0, 1, 2, 3])],
    },
    (2, 2): {
        "last": [([0], [0]), ([1], [1]), ([2], [2])],
        "skip": [([0], [0]), ([1], [1]), ([2], [2])],
        "average": [([0], [0]), ([1], [1]), ([2], [2])],
        "average_by_layers": [([0, 1, 2], [0, 1, 2])],
    },
    (2, 4): {  # a student deeper than its teacher: the roles swap
        "last": [([0], [2]), ([1], [3]), ([2], [4])],
        "skip": [([0], [0]), ([1], [2]), ([2], [4])],
        "average": [([0], [0]), ([1], [1, 2]), ([2], [3, 4])],
    },
}


@pytest.mark.parametrize("counts", list(EXPECTED))
def test_layer_pairs_for_any_layer_counts(counts):
    for strategy, expected in EXPECTED[counts].items():
        assert _pairs(strategy, *counts) == expected, (counts, strategy)
    lt, ls = counts
    assert _pairs("weighted_average_by_layers", lt, ls) == [(list(range(lt + 1)), list(range(ls + 1)))]
    assert _pairs("select_by_ids", lt, ls, [(-1, -1), (1, 0)]) == [([lt], [ls]), ([1], [0])]
    with pytest.raises(ValueError, match="out of range"):
        layer_pairs("select_by_ids", lt, ls, [(lt + 1, 0)])


def test_parse_layer_ids():
    assert parse_layer_ids('{"teacher": 12, "student": 3}') == [(12, 3)]
    assert parse_layer_ids('{"teacher": [4, 8], "student": [1, 2]}') == [(4, 1), (8, 2)]
    assert parse_layer_ids("[[4, 1], [-1, -1]]") == [(4, 1), (-1, -1)]
    for bad in ("{", '{"teacher": [1, 2], "student": [1]}', '{"t": 1}', "[]", '{"teacher": 1.5, "student": 1}'):
        with pytest.raises(ValueError):
            parse_layer_ids(bad)


def _states(n_layers: int, rows: int = 5, dim: int = 3, scale: float = 1.0) -> dict[int, torch.Tensor]:
    """State l is the constant (l * scale) everywhere, so combinations can be read off exactly."""
    return {i: torch.full((rows, dim), float(i) * scale) for i in range(n_layers + 1)}


@pytest.mark.parametrize("counts", [(12, 3), (4, 3), (2, 2)])
@pytest.mark.parametrize("strategy", ["last", "skip", "average", "average_by_layers", "weighted_average_by_layers",
                                      "pool_and_project"])
def test_selector_values_on_constructed_states(counts, strategy):
    lt, ls = counts
    selector = LayerSelector(strategy, lt, ls)
    pairs = selector(_states(lt, scale=10.0), _states(ls))
    expected = EXPECTED[counts].get(strategy, [(list(range(lt + 1)), list(range(ls + 1)))])
    assert len(pairs) == len(expected) == selector.n_pairs
    for (t, s), (t_layers, s_layers) in zip(pairs, expected):
        assert t.shape == (5, 3) and s.shape == (5, 3)
        torch.testing.assert_close(t, torch.full((5, 3), 10.0 * sum(t_layers) / len(t_layers)))
        torch.testing.assert_close(s, torch.full((5, 3), sum(s_layers) / len(s_layers)))


def test_learned_layer_weights_get_gradients_and_can_be_frozen():
    selector = LayerSelector("weighted_average_by_layers", 4, 3)
    assert {n for n, _ in selector.named_parameters()} == {"teacher_logits", "student_logits"}
    t_states = {i: torch.randn(6, 2) for i in range(5)}
    s_states = {i: torch.randn(6, 2) for i in range(4)}
    (t, s), = selector(t_states, s_states)
    (t.sum() + s.sum()).backward()
    assert selector.teacher_logits.grad.abs().sum() > 0 and selector.student_logits.grad.abs().sum() > 0
    frozen = LayerSelector("pool_and_project", 4, 3, train_weights=False)
    assert not list(frozen.parameters()) and set(frozen.state_dict()) == {"teacher_weights", "student_weights"}
    assert LayerSelector("skip", 12, 3).state_dict() == {}


def test_projector_dims_identity_init_and_freezing():
    proj = PairProjector(2, d_teacher=8, d_student=4, project_to="teacher")
    t, s = torch.randn(3, 8), torch.randn(3, 4)
    assert proj.teacher(0, t) is t and proj.student(1, s).shape == (3, 8)
    proj = PairProjector(1, 8, 4, "student")
    assert proj.teacher(0, t).shape == (3, 4) and proj.student(0, s) is s
    proj = PairProjector(1, 8, 4, "intermediate", intermediate_dim=5, trainable=False)
    assert proj.teacher(0, t).shape == (3, 5) and proj.student(0, s).shape == (3, 5)
    assert not any(p.requires_grad for p in proj.parameters())
    square = PairProjector(1, 4, 4, "teacher")
    torch.testing.assert_close(square.student(0, s), s)
    with pytest.raises(ValueError, match="intermediate_dim"):
        PairProjector(1, 8, 4, "intermediate")


def test_masked_mean_pool_ignores_padding():
    values = torch.tensor([[[1.0], [3.0], [100.0]], [[5.0], [-7.0], [9.0]], [[2.0], [2.0], [2.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    torch.testing.assert_close(masked_mean_pool(values, mask), torch.tensor([[2.0], [7.0 / 3], [0.0]]))


def test_mse_and_cosine_losses():
    s = torch.tensor([[1.0, 2.0], [0.0, 1.0]], requires_grad=True)
    t = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    torch.testing.assert_close(hidden_mse_loss(s, t), torch.tensor((4.0 + 10.0) / 2))
    cos = F.cosine_similarity(s.detach(), t, dim=-1)
    torch.testing.assert_close(hidden_cosine_loss(s, t), (1 - cos).mean())
    empty = torch.zeros(0, 2, requires_grad=True)
    for fn in (hidden_mse_loss, hidden_cosine_loss):
        loss = fn(empty, torch.zeros(0, 2))
        loss.backward()
        assert loss.item() == 0.0 and empty.grad is not None
    assert hidden_mse_loss(s.bfloat16(), t.bfloat16()).dtype == torch.float32


def test_sample_without_replacement():
    g = torch.Generator().manual_seed(0)
    n = torch.tensor([10, 3, 0, 1, 7])
    offsets, valid = sample_without_replacement(n, 4, g)
    assert offsets.shape == valid.shape == (5, 4)
    assert valid.sum(1).tolist() == [4, 3, 0, 1, 4]
    for row, count in enumerate(n.tolist()):
        chosen = offsets[row][valid[row]].tolist()
        assert len(set(chosen)) == len(chosen) and all(0 <= o < count for o in chosen)
        if count <= 4:
            assert sorted(chosen) == list(range(count))
    # uniform: every value of 0..5 equally often when drawing 2 of 6
    offsets, _ = sample_without_replacement(torch.full((30000,), 6), 2, g)
    freq = torch.bincount(offsets.flatten(), minlength=6).float() / offsets.numel()
    assert torch.allclose(freq, torch.full((6,), 1 / 6), atol=0.01)


def test_info_nce_closed_form():
    pos = torch.tensor([1.0, 0.0])
    neg = torch.tensor([[0.5, -1.0], [2.0, 0.3]])
    valid = torch.tensor([[True, True], [True, False]])
    t = 0.5
    row0 = -math.log(math.exp(2) / (math.exp(2) + math.exp(1) + math.exp(-2) + 2 * 0.1))
    row1 = -math.log(1 / (1 + math.exp(4) + 1 * 0.1))
    got = info_nce_loss(pos, neg, valid, temperature=t, noise_prob=0.1)
    assert got.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


# ----- contrastive loss against a plain loop --------------------------------------------------------------


def _loop_contrastive(teacher, student, strategy, k, prop, temperature, metric, c, seq, extra_t, extra_t_seq,
                      extra_s, extra_s_seq, noise, offsets_log):
    """Reference: one anchor at a time, candidates listed explicitly, the recorded offsets applied to them."""
    def sim(a, b):
        if metric == "cosine":
            return F.cosine_similarity(a, b, dim=0)
        return -pmath.dist(a, b, c=c)

    n = teacher.shape[0]
    t_pool = torch.cat([teacher, extra_t]) if extra_t is not None else teacher
    s_pool = torch.cat([student, extra_s]) if extra_s is not None else student
    t_seq = torch.cat([seq, extra_t_seq]) if extra_t is not None and seq is not None else seq
    s_seq = torch.cat([seq, extra_s_seq]) if extra_s is not None and seq is not None else seq
    if strategy == "student":
        anchors, positives, pools = teacher, student, [(s_pool, s_seq, k)]
    elif strategy == "teacher":
        anchors, positives, pools = student, teacher, [(t_pool, t_seq, k)]
    else:
        kt = -1 if k == -1 else math.floor(k * prop + 0.5)
        anchors, positives, pools = student, teacher, [(t_pool, t_seq, kt), (s_pool, s_seq, -1 if k == -1 else k - kt)]
    offsets = iter(offsets_log)
    negatives = [[] for _ in range(n)]
    for pool, pool_seq, kk in pools:
        if kk == 0:
            continue
        order = sorted(range(len(pool)), key=lambda m: (0 if pool_seq is None else int(pool_seq[m]), m))
        cands = [[m for m in order if m != i and (seq is None or int(pool_seq[m]) == int(seq[i]))] for i in range(n)]
        if kk == -1:
            for i in range(n):
                negatives[i] += [pool[m] for m in cands[i]]
            continue
        offs, valid = next(offsets)
        for i in range(n):
            negatives[i] += [pool[cands[i][o]] for o, v in zip(offs[i].tolist(), valid[i].tolist()) if v]
    total = 0.0
    for i in range(n):
        num = torch.exp(sim(anchors[i], positives[i]) / temperature)
        den = num + sum(torch.exp(sim(anchors[i], neg) / temperature) for neg in negatives[i])
        den = den + len(negatives[i]) * noise
        total = total - torch.log(num / den)
    return total / n


CASES = [
    # strategy, k, prop, from_one_sample, extras, metric, noise
    ("student", -1, 0.5, False, False, "cosine", 0.0),
    ("teacher", -1, 0.5, True, False, "cosine", 0.0),
    ("teacher_and_student", -1, 0.5, False, True, "poincare", 0.01),
    ("student", 3, 0.5, False, False, "cosine", 0.0),
    ("teacher", 2, 0.5, True, True, "poincare", 0.0),
    ("teacher_and_student", 5, 0.4, False, True, "cosine", 0.05),
    ("teacher_and_student", 4, 0.5, True, True, "cosine", 0.0),
    ("student", 50, 0.5, True, False, "poincare", 0.0),  # more negatives asked than candidates
]


@pytest.mark.parametrize("case", CASES)
def test_contrastive_equals_loop(case, monkeypatch):
    strategy, k, prop, one_sample, extras, metric, noise = case
    g = torch.Generator().manual_seed(hash(case) % 1000)
    n, d, c = 9, 4, 0.7
    teacher = torch.randn(n, d, generator=g, dtype=torch.float64)
    student = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    seq = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    extra_t = extra_s = extra_t_seq = extra_s_seq = None
    if extras:
        extra_t, extra_t_seq = torch.randn(3, d, generator=g, dtype=torch.float64), torch.tensor([2, 0, 1])
        extra_s, extra_s_seq = torch.randn(2, d, generator=g, dtype=torch.float64), torch.tensor([1, 1])
    if metric == "poincare":
        teacher, extra_t = pmath.expmap0(teacher, c=c), extra_t if extra_t is None else pmath.expmap0(extra_t, c=c)
        extra_s = extra_s if extra_s is None else pmath.expmap0(extra_s, c=c)
        s_in = pmath.expmap0(student, c=c)
    else:
        s_in = student
    log = []
    original = custom_step.sample_without_replacement

    def recording(n_candidates, kk, generator=None):
        out = original(n_candidates, kk, generator)
        log.append(out)
        return out

    monkeypatch.setattr(custom_step, "sample_without_replacement", recording)
    kwargs = dict(strategy=strategy, n_negatives=k, teacher_student_prop=prop, temperature=0.3, metric=metric,
                  c=c, noise_prob=noise)
    got = contrastive_loss(teacher, s_in, sequence_ids=seq if one_sample else None, extra_teacher=extra_t,
                           extra_teacher_seq=extra_t_seq, extra_student=extra_s, extra_student_seq=extra_s_seq,
                           generator=g, **kwargs)
    ref = _loop_contrastive(teacher, s_in, strategy, k, prop, 0.3, metric, c, seq if one_sample else None, extra_t,
                            extra_t_seq, extra_s, extra_s_seq, noise, log)
    torch.testing.assert_close(got, ref)
    (g_got,) = torch.autograd.grad(got, student, retain_graph=True)
    (g_ref,) = torch.autograd.grad(ref, student)
    torch.testing.assert_close(g_got, g_ref)


def test_contrastive_edge_cases():
    empty = torch.zeros(0, 3, requires_grad=True)
    loss = contrastive_loss(torch.zeros(0, 3), empty)
    loss.backward()
    assert loss.item() == 0.0 and empty.grad is not None
    one = torch.randn(1, 3, requires_grad=True)
    assert contrastive_loss(torch.randn(1, 3), one, n_negatives=4).item() == pytest.approx(0.0)
    with pytest.raises(ValueError, match="strategy"):
        contrastive_loss(one, one, strategy="both")
    # negatives drawn from the global RNG when no generator is given; perfectly aligned rows score lower
    x = torch.randn(16, 8)
    aligned = contrastive_loss(x, x.clone(), n_negatives=5, temperature=0.1)
    shuffled = contrastive_loss(x, x[torch.randperm(16)], n_negatives=5, temperature=0.1)
    assert aligned < shuffled


# ----- hyperbolic head and HiddenLosses -------------------------------------------------------------------


@pytest.mark.parametrize("hyp_proj", [False, True])
def test_hyperbolic_head_maps_into_the_ball_and_trains_c_on_one_side(hyp_proj):
    cfg = HyperbolicConfig(c=0.5, adjust_c="train_exp_map_student", train_x=True, use_hyperbolic_projections=hyp_proj)
    head = HyperbolicHead(cfg, 1, d_teacher=6, d_student=4, project_to="teacher")
    t, s = torch.randn(5, 6) * 10, torch.randn(5, 4) * 10
    tb, sb = head.teacher(0, t), head.student(0, s)
    assert tb.shape == sb.shape == (5, 6)
    assert (tb.norm(dim=-1) < 1 / math.sqrt(0.5)).all() and (sb.norm(dim=-1) < 1 / math.sqrt(0.5)).all()
    (g_t,) = torch.autograd.grad(tb.sum(), head.distance.log_c, allow_unused=True)
    assert g_t is None  # the teacher side sees c without gradient
    (g_s,) = torch.autograd.grad(sb.sum(), head.distance.log_c)
    assert torch.isfinite(g_s) and g_s != 0
    head.set_curvature(2.0)
    assert head.c.item() == pytest.approx(2.0)
    assert all(m.c.item() == pytest.approx(2.0) for m in head.modules() if hasattr(m, "c_fixed"))
    curvatures = {k for k in head.state_dict() if k.endswith(("log_c", "c_fixed"))}
    assert curvatures == {"distance.log_c", "student_map.c_fixed", "teacher_map.c_fixed"} | (
        {"student_hyp.0.c_fixed"} if hyp_proj else set())


def _batch():
    """Two sequences; teacher positions 0-4 / 0-3, student 0-5 / 0-2, with two and three matches."""
    t_mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    s_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    t_match = torch.tensor([[1, 0, 1, 0, 0, 0], [1, 1, 0, 1, 0, 0]], dtype=torch.bool)
    s_match = torch.tensor([[1, 0, 0, 0, 1, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    # t2s: teacher tokens split into 1 or 2 pieces, segments index the 9 real teacher positions
    segment = torch.tensor([[0, 1, 1, 2, 3, 4, 4], [5, 6, 7, 7, 8, -1, -1]])
    return {"t_mask": t_mask, "s_mask": s_mask, "t_match": t_match, "s_match": s_match, "t2s_mask": segment >= 0,
            "t2s_segment": segment}


@pytest.mark.parametrize("align", ["match", "reduce", "shared"])
def test_hidden_losses_rows_and_values(align):
    g = torch.Generator().manual_seed(3)
    batch = _batch()
    d = 4
    teacher_states = tuple(torch.randn(2, 6, d, generator=g) for _ in range(5))  # 4 teacher layers
    s_len = 7 if align == "reduce" else 6
    student_states = tuple(torch.randn(2, s_len, d, generator=g, requires_grad=True) for _ in range(4))  # 3 layers
    cfg = HiddenConfig(losses=("mse", "cos", "contrastive"), strategy="skip")
    positions = {"match": MatchPositions(), "reduce": ReducePositions("sum"), "shared": SharedPositions()}[align]
    module = HiddenLosses(cfg, positions, 4, 3, d, d)  # square projections start as the identity
    out = module(batch, teacher_states, student_states)
    assert set(out) == {"loss_mse", "loss_cos", "loss_contrastive"}
    pairs = [(0, 0), (2, 1), (3, 2), (4, 3)]  # skip for 4/3
    mse, cos = [], []
    for t_l, s_l in pairs:
        if align == "match":
            t, s = teacher_states[t_l][batch["t_match"]], student_states[s_l][batch["s_match"]]
        elif align == "shared":
            t, s = teacher_states[t_l][batch["s_mask"]], student_states[s_l][batch["s_mask"]]
        else:
            t = teacher_states[t_l][batch["t_mask"]]
            pieces = student_states[s_l][batch["t2s_mask"]]
            s = torch.zeros(9, d).index_add(0, batch["t2s_segment"][batch["t2s_mask"]], pieces)
        mse.append(((s - t) ** 2).sum(-1).mean())
        cos.append((1 - F.cosine_similarity(s, t, dim=-1)).mean())
    torch.testing.assert_close(out["loss_mse"], torch.stack(mse).mean())
    torch.testing.assert_close(out["loss_cos"], torch.stack(cos).mean())
    sum(out.values()).backward()
    assert all(s.grad is not None for s in student_states)
    assert all(p.grad is not None for p in module.parameters())


def test_hidden_losses_pool_and_project_and_errors():
    from kdcore.errors import UserError

    batch = _batch()
    teacher_states = tuple(torch.randn(2, 6, 8) for _ in range(3))
    student_states = tuple(torch.randn(2, 6, 4) for _ in range(3))
    cfg = HiddenConfig(losses=("mse",), strategy="pool_and_project", project_to="student")
    module = HiddenLosses(cfg, MatchPositions(), 2, 2, 8, 4)
    rows = module.rows(batch, teacher_states, student_states)
    assert rows.teacher[1].shape == (2, 8) and rows.student[2].shape == (2, 4)
    torch.testing.assert_close(rows.teacher[1][1], teacher_states[1][1, :4].mean(0))
    assert torch.isfinite(module(batch, teacher_states, student_states)["loss_mse"])
    bad = dict(batch, s_match=batch["s_mask"])
    token_level = HiddenLosses(HiddenConfig(losses=("mse",)), MatchPositions(), 2, 2, 8, 4)
    with pytest.raises(UserError, match="match masks"):
        token_level(bad, teacher_states, student_states)


def test_hyperbolic_hidden_losses_with_mismatched_negatives_and_bf16():
    batch = _batch()
    g = torch.Generator().manual_seed(5)
    teacher_states = tuple(torch.randn(2, 6, 8, generator=g) for _ in range(3))
    student_states = tuple(torch.randn(2, 6, 4, generator=g, requires_grad=True) for _ in range(3))
    cfg = HiddenConfig(losses=("contrastive",), strategy="last", n_negatives=2, negative_strategy="teacher_and_student",
                       use_mismatched_ids=True, from_one_sample=True,
                       hyperbolic=HyperbolicConfig(c=1.3, adjust_c="train_exp_map_teacher"))
    module = HiddenLosses(cfg, MatchPositions(), 2, 2, 8, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module(batch, tuple(t.bfloat16() for t in teacher_states), student_states)["loss_contrastive"]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert module.hyperbolic.distance.log_c.grad is not None
