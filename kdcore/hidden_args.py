"""Command-line pieces shared by `train.py` and `distil-finetuned-en/train.py` for the hidden-state losses: the
optional trailing `hyperbolic` sub-command and the checks common to both CLIs.

Nothing here imports torch at module level (parsing the command line stays light); the choice lists are
passed in by each CLI.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

from kdcore.errors import UserError


def add_hyperbolic_subcommand(p: argparse.ArgumentParser, *, adjust_c: Sequence[str], delta_vectors: Sequence[str],
                              delta_vectors_help: str, init_c_data: str) -> None:
    """Add the optional trailing `hyperbolic` sub-command (dest `hidden_distil_type`) to `p`; without it its
    options keep their defaults. adjust_c: the --adjust_c choices; delta_vectors: the --delta_vectors choices,
    the first being the default; init_c_data: the data --init_c estimates c on, for the help."""
    sub = p.add_subparsers(dest="hidden_distil_type", title="optional sub-command (last on the command line)",
                           metavar="{hyperbolic}")
    h = sub.add_parser("hyperbolic", help="contrastive loss in the Poincare ball (needs --alpha_contrastive)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Contrastive loss with the negative Poincare distance at curvature c.")
    h.add_argument("--c", type=float, default=1.0, help="curvature (-c) of the ball, or its initial value")
    h.add_argument("--init_c", choices=("precompute_from_teacher", "precompute_from_student"),
                   help=f"estimate c from the teacher's or the student's outputs on {init_c_data}")
    h.add_argument("--n_samples_to_precompute_c", type=int, default=1000, help="output vectors sampled")
    h.add_argument("--n_components", type=int, default=100, help="PCA components before the Gromov delta")
    h.add_argument("--n_tries", type=int, default=3, help="random subsets averaged")
    h.add_argument("--delta_vectors", choices=tuple(delta_vectors), default=delta_vectors[0], help=delta_vectors_help)
    h.add_argument("--adjust_c", choices=tuple(adjust_c),
                   help="train c through the teacher's or the student's exp map, or re-estimate it after every "
                   "epoch (from the student; from the teacher with --init_c precompute_from_teacher)")
    h.add_argument("--riemannian", action=argparse.BooleanOptionalAction, default=True,
                   help="Riemannian gradient rescaling in the exp maps")
    h.add_argument("--train_x", action="store_true", help="exp maps at a trainable point instead of the origin")
    h.add_argument("--use_hyperbolic_projections", action="store_true",
                   help="map to the ball first, then project with HypLinear (Mobius) layers")
    h.add_argument("--use_bias", action=argparse.BooleanOptionalAction, default=True,
                   help="Mobius bias in the HypLinear projections")
    # without the sub-command its options keep their defaults
    p.set_defaults(**{act.dest: act.default for act in h._actions if act.dest != "help"})


def validate_hidden_losses(a: argparse.Namespace, *, row: str = "sequence") -> None:
    """One-line errors for the layer, projection, contrastive and hyperbolic options, once some hidden-state
    loss is on (each CLI checks its own options first). row: what one row of pool_and_project stands for
    ("sequence", "example"), for the messages."""
    from kdcore.hidden_projection import parse_layer_ids

    if a.projection_strategy == "select_by_ids":
        if not a.t_s_layers_ids:
            raise UserError('--projection_strategy select_by_ids needs --t_s_layers_ids, e.g. '
                            '\'{"teacher": [4, 8, 12], "student": [1, 2, 3]}\'')
        try:
            parse_layer_ids(a.t_s_layers_ids)
        except ValueError as err:
            raise UserError(str(err)) from err
    if a.project_to == "intermediate" and not (a.intermediate_dim and a.intermediate_dim > 0):
        raise UserError("--project_to intermediate needs a positive --intermediate_dim")
    if a.alpha_contrastive > 0:
        if a.n_negative_samples < 1 and a.n_negative_samples != -1:
            raise UserError(f"--n_negative_samples {a.n_negative_samples} must be positive, or -1 for all")
        if not 0 <= a.teacher_student_prop <= 1:
            raise UserError(f"--teacher_student_prop {a.teacher_student_prop} must be in [0, 1]")
        if a.contrastive_temperature is not None and a.contrastive_temperature <= 0:
            raise UserError("--contrastive_temperature must be positive")
        if a.from_one_sample and a.projection_strategy == "pool_and_project":
            article = "an" if row[0] in "aeiou" else "a"
            raise UserError(f"--from_one_sample draws negatives inside {article} {row}; pool_and_project has one row "
                            f"per {row}")
    if a.hidden_distil_type == "hyperbolic":
        if not (a.c > 0 and math.isfinite(a.c)):
            raise UserError(f"--c {a.c} must be a positive curvature")
        for flag, low in (("n_samples_to_precompute_c", 2), ("n_components", 1), ("n_tries", 1)):
            if getattr(a, flag) < low:
                raise UserError(f"--{flag} must be at least {low}")
