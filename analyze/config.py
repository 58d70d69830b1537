"""AnalysisConfig: every knob of the offline analysis, with the formula-sheet defaults (docs/metrics).

One frozen dataclass; the `report` command's options map onto its fields. `cache_key()` hashes
the fields that change per-checkpoint results, so a changed setting invalidates the cache (the
healthy rho band does: the grad-ratio rows carry their §11 verdict).

Every rule threshold of the analysis and the checkpoint audit is a field here, nowhere else. The
audit's two (`max_abs_warn`, `sigma_warn`) are ours, not the sheet's:
* ``max_abs_warn = 1e4``: no trained float weight we know of has entries this large (typical
  entries are O(1) or smaller; LayerNorm gains reach tens); float16 overflows at 6.5e4.
* ``sigma_warn = 1e3``: spectral norms of trained matrices are O(1)-O(100) (the largest in
  all-MiniLM-L6-v2 is its 30k x 384 word embedding, ~29); 1e3 means a layer that amplifies
  its input a thousandfold, the signature of a diverged run.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields

__all__ = ["AnalysisConfig", "EXACT_SVD_AUTO_MAX_PARAMS", "POWER_ITERATION_MAX_PARAMS", "CACHE_VERSION",
           "default_workers"]

EXACT_SVD_AUTO_MAX_PARAMS = 10_000_000  # exact SVD beside the estimators up to ~10M parameters
# the sheet's power iteration beside the default estimator up to 200M parameters: every matrix of
# the demo and of GPT-2-small (124M) gets it; at 1.1B it would cost 1.5x the estimator (docs/scaling.md)
POWER_ITERATION_MAX_PARAMS = 200_000_000
CACHE_VERSION = 7  # bump when the per-checkpoint rows change shape or meaning


def default_workers() -> int:
    """CPU cores this process may use (the `--workers` default). Here rather than only in
    `analyze.pipeline.runners`, which imports torch, so that a cached report need not import it."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True, slots=True)
class AnalysisConfig:
    """Settings of `analyze_run`; defaults are the formula-sheet values (docs/metrics) (section in brackets)."""

    exact_svd: bool | None = None        # None = auto: on for models up to EXACT_SVD_AUTO_MAX_PARAMS (§4)
    power_tol: float = 1e-4              # the sheet's power-iteration stop (§4)
    power_max_iter: int = 100            # the sheet's iteration cap (§4)
    power_iteration: bool = True         # run the sheet's method beside the default estimator (validation table)
    power_iteration_max_params: int | None = POWER_ITERATION_MAX_PARAMS  # ... on checkpoints up to this many
                                         # parameters (None: any size); above it sigma_power is NaN (§4)
    estimator_rel_tol: float = 1e-3      # default estimator must be this close to exact (§4)
    dead_eps: float = 1e-3               # dead FFN unit threshold on |H| (§5)
    spike_window: int = 50               # logged points in the median/MAD window (§9)
    spike_k: float = 6.0                 # MAD units above the median (§9)
    gl_alpha: float = 5.0                # Prechelt GL_alpha in percent (§10)
    divergence_delta: float = 0.05       # nats the smoothed gap must widen by (§10)
    divergence_spearman: float = 0.8     # ... with Spearman(t, gap) at least this after its last record low (§10)
    divergence_min_evals: int = 3        # ... over at least this many evaluations after it (§10)
    overfit_trend_evals: int = 3         # last evaluations whose trend tells a sustained rise from a recovered
                                         # bump: "overfitting" needs GL > gl_alpha at the end and at the trend
                                         # projected one span ahead (ours; §10 leaves recovery open)
    memorisation_ratio: float = 0.25     # memorisation: train loss <= this x validation loss at the last
    memorisation_min_gap: float = 0.1    # evaluation, and at least this many nats below it (ours)
    tau_disagreement_se: float = 2.0     # training-window tau vs checkpoint tau: combined SEs apart (§8)
    rho_low: float = 1e-4                # healthy grad-to-weight ratio range, inclusive (§11)
    rho_high: float = 1e-1
    update_ratio_low: float = 1e-5       # per-step update ratio range shown as healthy (§12: ~1e-3)
    update_ratio_high: float = 1e-2
    spectral_growth: float = 2.0         # flag sigma_1 growing by more than this factor, mid-run -> last
                                         # (analyze.metrics.growth; §4, §12)
    dead_fraction_warn: float = 0.05     # dead FFN unit fraction that makes the finding a warning (§5)
    logit_growth: float = 2.0            # max attention logit growing by more than this factor, first -> last,
    logit_growth_min: float = 10.0       # ... and ending above this value, is reported (§12)
    # expected tau on the built-in corpus, nats (§8): (first step, last step, low, high); None steps
    # mean the end of the run (the band the tau_band finding holds the last window against)
    expected_tau_bands: tuple[tuple[int | None, int | None, float, float], ...] = (
        (0, 100, -0.1, 0.1), (400, 600, 0.5, 1.0), (None, None, 0.2, 0.5))
    tau_band_min_steps: int = 1000       # the end band describes the ~2000-step demo: shorter runs are not judged
    max_abs_warn: float = 1e4            # checkpoint audit: |w| above this is "exploding weights" (see below)
    sigma_warn: float = 1e3              # checkpoint audit: sigma_1 above this is "large spectral norm" (see below)
    spectral_outlier_ratio: float = 5.0  # audit: sigma_1 / its family's median above this (or below 1/this) is a
                                         # spectral_outlier (family: same name but the layer index, same shape;
                                         # real weights measured within 0.69-1.31, see docs/metrics/static-checks.md)
    norm_outlier_ratio: float = 5.0      # audit: the same rule on the Frobenius norm (norm_outlier)
    family_min_size: int = 3             # audit: families with fewer finite members are not judged
    embedding_zero_rows_ok: int = 1      # audit: all-zero embedding rows kept as info up to this count (padding row)
    family_moved_ratio: float = 10.0     # audit --baseline: a family whose median ||W-W0||/||W0|| is this many
                                         # times the median over families is family_moved
    class_window: int = 50               # training steps per per-class Welford window (§8)
    class_pair: tuple[str, str] | None = None  # (hard, easy) for tau; None = built-in / automatic
    eval_batch_size: int = 64            # examples per forward batch on the stored eval set
    max_eval_examples: int | None = None  # cap on eval examples (None = all)
    grad_batch_size: int = 32            # examples in the one backward pass for rho (§11)
    eval_data: str | None = None         # --eval-data: text / JSONL / val.bin / eval_set.safetensors for the model pass
    eval_max_sequences: int = 256        # --eval-data: at most this many sequences (a seeded uniform sample) ...
    eval_seq_len: int = 128              # ... of at most this many tokens (and the model's context)
    eval_seed: int = 0                   # sampling seed of --eval-data and of the rho batch
    model_factory: str | None = None     # "module:function" for a user's own model (explicit only)
    workers: int = 1                     # processes for the per-checkpoint tasks (1: in this process)
    scheduler: str | None = None         # Dask scheduler address: run the tasks there instead
    seed: int = 0                        # cold-start vectors of the estimators

    def __post_init__(self) -> None:
        checks = {
            "power_tol": self.power_tol > 0, "power_max_iter": self.power_max_iter >= 1,
            "power_iteration_max_params": self.power_iteration_max_params is None or self.power_iteration_max_params >= 0,
            "dead_eps": self.dead_eps > 0, "spike_window": self.spike_window >= 2,
            "spike_k": self.spike_k > 0, "gl_alpha": self.gl_alpha > 0,
            "divergence_delta": self.divergence_delta >= 0, "class_window": self.class_window >= 1,
            "divergence_min_evals": self.divergence_min_evals >= 1, "overfit_trend_evals": self.overfit_trend_evals >= 2,
            "memorisation_ratio": 0 < self.memorisation_ratio < 1, "memorisation_min_gap": self.memorisation_min_gap >= 0,
            "tau_disagreement_se": self.tau_disagreement_se > 0,
            "spectral_outlier_ratio": self.spectral_outlier_ratio > 1, "norm_outlier_ratio": self.norm_outlier_ratio > 1,
            "family_min_size": self.family_min_size >= 3, "embedding_zero_rows_ok": self.embedding_zero_rows_ok >= 0,
            "family_moved_ratio": self.family_moved_ratio > 1,
            "eval_batch_size": self.eval_batch_size >= 1, "grad_batch_size": self.grad_batch_size >= 1,
            "eval_max_sequences": self.eval_max_sequences >= 1, "eval_seq_len": self.eval_seq_len >= 2,
            "workers": self.workers >= 1, "rho_low": 0 < self.rho_low < self.rho_high,
            "expected_tau_bands": all(len(b) == 4 and b[2] <= b[3] for b in self.expected_tau_bands),
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError("invalid AnalysisConfig value(s): "
                             + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad))
        if self.class_pair is not None and len(self.class_pair) != 2:
            raise ValueError(f"class_pair must be (hard, easy), got {self.class_pair!r}")

    @property
    def expected_tau_end(self) -> tuple[float, float] | None:
        """(low, high) of the end-of-run tau band (the one without steps), None when there is none."""
        ends = [(lo, hi) for start, stop, lo, hi in self.expected_tau_bands if start is None and stop is None]
        return ends[-1] if ends else None

    def use_exact_svd(self, n_params: int) -> bool:
        """Exact SVD on or off for a checkpoint of `n_params` parameters."""
        return self.exact_svd if self.exact_svd is not None else n_params <= EXACT_SVD_AUTO_MAX_PARAMS

    def use_power_iteration(self, n_params: int) -> bool:
        """The sheet's power iteration on or off for a checkpoint of `n_params` parameters."""
        limit = self.power_iteration_max_params
        return self.power_iteration and (limit is None or n_params <= limit)

    def cache_key(self) -> str:
        """Hash of the fields that change per-checkpoint results (not where they run, not log-only knobs)."""
        skip = {"workers", "scheduler", "spike_window", "spike_k", "gl_alpha", "divergence_delta",
                "divergence_spearman", "divergence_min_evals", "overfit_trend_evals", "memorisation_ratio",
                "memorisation_min_gap", "tau_disagreement_se",
                "class_window", "class_pair", "spectral_growth", "update_ratio_low", "update_ratio_high",
                "estimator_rel_tol", "dead_fraction_warn", "logit_growth", "logit_growth_min",
                "expected_tau_bands", "tau_band_min_steps", "max_abs_warn", "sigma_warn",
                "spectral_outlier_ratio", "norm_outlier_ratio", "family_min_size", "embedding_zero_rows_ok",
                "family_moved_ratio"}
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        d["cache_version"] = CACHE_VERSION
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return asdict(self)
