"""The scaling ladder: fit validation bits per byte against training compute, predict the next size.

Train a few presets at the same tokens-per-parameter ratio, then fit bpb = a * C^(-alpha) (C in
training FLOPs) by least squares in log-log space, the standard scaling-law form. The fit's error
(standard errors of slope and intercept, and a t-distribution prediction interval with n - 2
degrees of freedom) is what tells a user how far to trust the prediction for the next preset up,
and what that preset will cost to train. Pure functions: the `forja ladder` flow trains the
rungs, logs to MLflow and calls these.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.config import PRESETS, ModelConfig
from model.diagram import human

MIN_SIZES = 3  # a power law has two parameters; a third size is the first that measures its error
LEVEL = 0.95  # the prediction interval's coverage


class LadderError(ValueError):
    """A ladder that cannot be fitted or extended; the message says what to add or change."""


@dataclass
class Rung:
    """One trained size: its preset, parameters, trained tokens, training FLOPs and validation bpb."""

    name: str
    params: int
    tokens: int
    flops: float
    bpb: float


@dataclass
class Prediction:
    """A predicted bpb and its 95% prediction interval (where a new run at that compute should land)."""

    bpb: float
    low: float
    high: float


@dataclass
class PowerLaw:
    """bpb = a * flops^(-alpha), fitted in log space (natural logs); the fields keep what predict needs."""

    a: float
    alpha: float
    se_alpha: float  # standard error of the slope (alpha)
    se_log_a: float  # standard error of the intercept, ln(a)
    r2: float  # in log space
    residuals: list[float]  # ln(bpb) - ln(fitted bpb), in the rungs' order
    n: int
    s: float  # residual standard deviation in log space, n - 2 degrees of freedom
    mean_log_flops: float
    sxx: float  # sum of squared deviations of ln(flops)

    def predict(self, flops: float) -> Prediction:
        """The fitted bpb at `flops` and its 95% prediction interval: the fit's residual error plus the
        uncertainty of the line itself, which grows with the distance from the fitted compute range."""
        if not (math.isfinite(flops) and flops > 0):
            raise LadderError(f"cannot predict at flops={flops!r}: compute must be a positive finite number")
        from scipy.stats import t

        x = math.log(flops)
        centre = math.log(self.a) - self.alpha * x
        half = t.ppf(0.5 + LEVEL / 2, self.n - 2) * self.s * math.sqrt(
            1 + 1 / self.n + (x - self.mean_log_flops) ** 2 / self.sxx)
        return Prediction(bpb=math.exp(centre), low=math.exp(centre - half), high=math.exp(centre + half))


@dataclass
class Plan:
    """The next size up: its preset, parameters, tokens (the largest rung's tokens per parameter),
    the training compute that needs, and the bpb the fit predicts for it."""

    name: str
    params: int
    tokens: int
    flops: float
    prediction: Prediction


def meta_model(cfg: ModelConfig):
    """The GPT built on torch's meta device: shapes only, so a 1b preset costs no memory or time."""
    import torch

    from model.gpt import GPT

    with torch.device("meta"):
        return GPT(cfg)


def training_flops(cfg: ModelConfig, tokens: int) -> float:
    """Compute of training cfg's model on `tokens` tokens: GPT.flops_per_token (already the training
    count, forward + backward = 3 x forward: 6N plus attention, the figure the training MFU uses)
    times the tokens."""
    return float(meta_model(cfg).flops_per_token() * tokens)


def _suggest(names: set[str], presets: dict) -> str:
    """The presets to pass so the ladder has MIN_SIZES sizes: the given ones plus the next in PRESETS order."""
    order = list(presets)
    known = sorted((n for n in names if n in presets), key=order.index)
    start = order.index(known[-1]) + 1 if known else 0
    extra = [n for n in order[start:] + order[:start][::-1] if n not in names]
    return ",".join(sorted(known + extra[:max(MIN_SIZES - len(known), 0)], key=order.index))


def check_presets(names: list[str], presets: dict = PRESETS) -> None:
    """Before anything trains: the ladder's presets exist and are at least MIN_SIZES distinct sizes."""
    unknown = [n for n in names if n not in presets]
    if unknown:
        raise LadderError(f"--presets: {', '.join(map(repr, unknown))} not a preset; choose from {', '.join(presets)}")
    if len(set(names)) < MIN_SIZES:
        raise LadderError(
            f"cannot fit a scaling ladder to {len(set(names))} size(s) ({', '.join(names) or 'none'}): a power law "
            f"has two parameters, so fewer than {MIN_SIZES} sizes leave no error to estimate; add --presets "
            f"{_suggest(set(names), presets)}")


def _check(rungs: list[Rung]) -> None:
    for r in rungs:
        for field in ("params", "tokens", "flops", "bpb"):
            v = getattr(r, field)
            if not (isinstance(v, numbers.Real) and math.isfinite(v) and v > 0):
                raise LadderError(f"ladder rung {r.name!r} has {field}={v!r}: every rung needs a positive finite "
                                  f"{field}; retrain or drop that rung")
    sizes = {r.params for r in rungs}
    if len(sizes) < MIN_SIZES:
        names = {r.name for r in rungs}
        raise LadderError(
            f"cannot fit a scaling ladder to {len(sizes)} size(s) ({', '.join(sorted(names)) or 'none'}): a power "
            f"law has two parameters, so with {len(sizes)} size(s) there is no error to estimate; "
            f"add --presets {_suggest(names, PRESETS)} (at least {MIN_SIZES} sizes)")
    if len({r.flops for r in rungs}) < 2:
        raise LadderError(f"every rung has the same training compute ({rungs[0].flops:.3g} FLOPs): the slope "
                          "against compute is undefined; train the sizes at matched tokens per parameter so "
                          "their compute differs")


def fit(rungs: list[Rung]) -> PowerLaw:
    """Least-squares fit of ln(bpb) = ln(a) - alpha ln(flops) over the rungs, with the standard errors,
    R^2 and residuals in log space. LadderError when the rungs cannot support a fit with an error."""
    rungs = list(rungs)
    _check(rungs)
    from scipy.stats import linregress

    x = np.log([r.flops for r in rungs])
    y = np.log([r.bpb for r in rungs])
    line = linregress(x, y)
    residuals = y - (line.intercept + line.slope * x)
    n = len(rungs)
    ss_res, ss_tot = float(residuals @ residuals), float(((y - y.mean()) ** 2).sum())
    return PowerLaw(a=math.exp(line.intercept), alpha=float(-line.slope), se_alpha=float(line.stderr),
                    se_log_a=float(line.intercept_stderr), r2=1 - ss_res / ss_tot if ss_tot > 0 else 1.0,
                    residuals=residuals.tolist(), n=n, s=math.sqrt(ss_res / (n - 2)),
                    mean_log_flops=float(x.mean()), sxx=float(((x - x.mean()) ** 2).sum()))


def next_rung(rungs: list[Rung], presets: dict = PRESETS, *, vocab_size: int, seq_len: int) -> Plan | None:
    """The preset after the largest rung's in `presets` order, trained at the largest rung's tokens per
    parameter: its parameters, tokens, compute and predicted bpb. None when the largest rung is the
    last preset (there is no next size to predict)."""
    rungs = list(rungs)
    law = fit(rungs)
    order = list(presets)
    unknown = [r.name for r in rungs if r.name not in presets]
    if unknown:
        raise LadderError(f"ladder rung(s) {', '.join(map(repr, unknown))} are not presets; "
                          f"choose from {', '.join(order)}")
    top = max(rungs, key=lambda r: (order.index(r.name), r.tokens))
    if order.index(top.name) + 1 == len(order):
        return None
    name = order[order.index(top.name) + 1]
    cfg = ModelConfig(vocab_size=vocab_size, block_size=seq_len, **presets[name])
    model = meta_model(cfg)
    params = model.num_params()
    tokens = round(params * top.tokens / top.params)
    flops = float(model.flops_per_token() * tokens)
    return Plan(name=name, params=params, tokens=tokens, flops=flops, prediction=law.predict(flops))


def report_markdown(rungs: list[Rung], fit: PowerLaw, plan: Plan | None) -> str:
    """The ladder as markdown: a row per rung (with the fit's value and residual), the fitted law with its
    errors, and the next size's predicted bpb with its 95% interval and cost."""
    lines = ["# Scaling ladder: validation bits per byte against training compute", "",
             "| preset | parameters | tokens | tokens/param | FLOPs | val bpb | fitted bpb | residual (ln) |",
             "|---|---|---|---|---|---|---|---|"]
    for r, res in zip(rungs, fit.residuals):
        fitted = fit.a * r.flops ** -fit.alpha
        lines.append(f"| {r.name} | {human(r.params)} | {human(r.tokens)} | {r.tokens / r.params:.1f} | "
                     f"{r.flops:.3g} | {r.bpb:.4f} | {fitted:.4f} | {res:+.4f} |")
    lines += ["", f"Fit: bpb = {fit.a:.4g} × FLOPs^(−{fit.alpha:.4f} ± {fit.se_alpha:.4f}); "
              f"ln a = {math.log(fit.a):.3f} ± {fit.se_log_a:.3f}; R² = {fit.r2:.4f} (log space); "
              f"{fit.n} points, residual sd {fit.s:.4f} (ln), {fit.n - 2} degrees of freedom.", ""]
    if plan is None:
        lines.append("Next size: none (the largest rung is the last preset).")
    else:
        p = plan.prediction
        lines.append(f"Next size: **{plan.name}**, {human(plan.params)} parameters, {human(plan.tokens)} tokens "
                     f"(same tokens per parameter), {plan.flops:.3g} FLOPs: predicted bpb **{p.bpb:.4f}** "
                     f"({LEVEL:.0%} interval {p.low:.4f} – {p.high:.4f}).")
    return "\n".join(lines) + "\n"


def plot(rungs: list[Rung], fit: PowerLaw, plan: Plan | None, path: Path) -> Path:
    """Log-log bpb against FLOPs as a PNG: the rungs labelled by preset, the fitted line extended to the
    next size, and its prediction with the 95% interval as an error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    flops = [r.flops for r in rungs]
    ax.plot(flops, [r.bpb for r in rungs], "o", color="tab:blue", label="trained")
    for r in rungs:
        ax.annotate(r.name, (r.flops, r.bpb), textcoords="offset points", xytext=(5, 5), fontsize=9)
    hi = max(flops + ([plan.flops] if plan else []))
    xs = np.geomspace(min(flops) / 1.5, hi * 1.5, 100)
    ax.plot(xs, fit.a * xs ** -fit.alpha, "--", color="tab:gray",
            label=f"fit: {fit.a:.3g}·C^(−{fit.alpha:.3f}±{fit.se_alpha:.3f}), R²={fit.r2:.3f}")
    if plan is not None:
        p = plan.prediction
        ax.errorbar([plan.flops], [p.bpb], yerr=[[p.bpb - p.low], [p.high - p.bpb]], fmt="s", color="tab:red",
                    capsize=5, label=f"{plan.name} predicted ({LEVEL:.0%} interval)")
        ax.annotate(plan.name, (plan.flops, p.bpb), textcoords="offset points", xytext=(6, 5), fontsize=9)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set(xlabel="training compute (FLOPs)", ylabel="validation bits per byte")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title("forja: scaling ladder")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = ["LadderError", "Rung", "PowerLaw", "Prediction", "Plan", "training_flops", "fit", "next_rung",
           "report_markdown", "plot"]
