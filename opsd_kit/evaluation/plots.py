"""Matplotlib figures the notebooks show. Each returns the figure; nothing is shown or saved
unless the caller asks."""
from __future__ import annotations

import html
import textwrap


def prompt_lengths(student_lengths, teacher_lengths, *, title: str = "", unit: str = "tokens"):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist([student_lengths, teacher_lengths], bins=30, label=["student", "teacher"])
    ax.set_xlabel(f"prompt {unit}")
    ax.set_ylabel("problems")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def training_curves(metrics, *, title: str = ""):
    """Loss, divergence (OPSD) and its SFT term, or reward and the share of groups with mixed
    rewards (GRPO: 0 means no signal), rollout correctness, and cumulative tokens per step."""
    import matplotlib.pyplot as plt

    panels = [("loss/total", "loss"), ("loss/divergence_mean", "mean per-token divergence"),
              ("loss/sft", "SFT loss (sft_weight)"), ("grpo/reward_mean", "mean reward"),
              ("grpo/mixed_groups", "groups with mixed rewards"), ("rollout/correct", "rollout correctness"),
              ("tokens/generated_total", "generated tokens (cumulative)"), ("time/step", "seconds per step")]
    panels = [(k, label) for k, label in panels if k in metrics.columns]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3), squeeze=False)
    from matplotlib.ticker import MaxNLocator

    for ax, (key, label) in zip(axes[0], panels):
        ax.plot(metrics["step"], metrics[key], marker=".")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(key, fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def token_efficiency(points, *, mode: str, ratio: dict | None = None, a: str = "opsd", b: str = "grpo"):
    """Held-out accuracy curves (with their 95% intervals) against the rollout tokens a method
    generated in training, and against training wall time.

    ``points``: the point table of `opsd_kit.evaluation.study.summarize` (one row per method and step,
    ``<mode>/avg@k``, ``<mode>/ci_low``, ``<mode>/ci_high``). Each method is a curve from the
    base model (at 0) through its checkpoints in order, its interval a shaded band with error
    bars; the base model is a grey band (its interval) on both panels. Methods that generate
    nothing (SFT) appear on the time panel only. ``ratio``:
    `opsd_kit.evaluation.study.tokens_to_equal_accuracy` for this mode, drawn as its target
    accuracy (dotted line) and the interpolated tokens where each curve first reaches it
    (crosses), with the ratio and its interval in the panel's title, or why it is undefined.
    """
    import matplotlib.pyplot as plt

    column, low, high = f"{mode}/avg@k", f"{mode}/ci_low", f"{mode}/ci_high"
    k, n = int(points["k"].iloc[0]), int(points["n_eval"].iloc[0])
    base = points[points["step"] == 0].iloc[0]
    fig, (ax_tokens, ax_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    trained = points[points["step"] > 0]
    color_of = {}
    for i, (method, rows) in enumerate(trained.groupby("method", sort=False)):
        rows = rows.sort_values("step")
        color_of[method] = colors[i % len(colors)]
        style = dict(marker="o", capsize=3, color=color_of[method], label=method)
        for ax, x in ((ax_tokens, "generated_tokens"), (ax_time, "train_seconds")):
            if x == "generated_tokens" and not rows[x].gt(0).any():
                continue
            xs = [0, *rows[x]]
            ax.plot(xs, [base[column], *rows[column]], color=style["color"], lw=1)  # the curve, from the base
            ax.fill_between(xs, [base[low], *rows[low]], [base[high], *rows[high]], color=style["color"],
                            alpha=0.12, lw=0)
            # an interval ends at its estimate at 0% and 100%: a zero-length bar, never a negative one
            err = [(rows[column] - rows[low]).clip(lower=0), (rows[high] - rows[column]).clip(lower=0)]
            ax.errorbar(rows[x], rows[column], yerr=err, ls="none", **style)
    for ax in (ax_tokens, ax_time):
        ax.axhspan(base[low], base[high], color="grey", alpha=0.2, label="base (95% interval)")
        ax.axhline(base[column], color="grey", lw=1)
        ax.set_ylabel(f"held-out avg@{k}, {mode} grading")
        ax.grid(alpha=0.3)
    ax_tokens.set_xlabel("rollout tokens generated in training (cumulative)")
    ax_time.set_xlabel("training wall-clock seconds")
    ax_tokens.set_xscale("symlog", linthresh=1000)
    most = max(float(trained["generated_tokens"].max()) if len(trained) else 0.0, 1000.0)
    ax_tokens.set_xticks([t for t in (0, 1e3, 1e4, 1e5, 1e6, 1e7) if t <= 10 * most])  # no 10^2 beside the 0
    title = "on-policy methods"
    if ratio is not None:
        if ratio.get("ratio") is not None:
            target = ratio["target_accuracy"]
            ax_tokens.axhline(target, color="black", ls=":", lw=1,
                              label=f"target: base + {ratio.get('target_fraction', 1.0):.0%} of the smaller gain")
            for m in (a, b):
                ax_tokens.plot([ratio[f"tokens_{m}"]], [target], marker="X", ms=9, color=color_of.get(m, "black"),
                               ls="none")
            interval = ""
            if ratio.get("ci_low") is not None:
                interval = (f" [95% CI {ratio['ci_low']:.2g}, {ratio['ci_high']:.2g}; defined in "
                            f"{100 * ratio['defined_fraction']:.0f}% of resamples]")
            title = (f"{b} needs {ratio['ratio']:.2g}x{interval} the rollout tokens of {a} "
                     f"to first reach {target:.3f}")
        else:
            title = f"tokens-to-equal-accuracy undefined: {ratio.get('reason', '')}"
    ax_tokens.set_title(textwrap.fill(title, 70), fontsize=9)
    ax_time.set_title("all methods (SFT generates no rollout tokens)", fontsize=9)
    ax_tokens.legend(fontsize=8)
    ax_time.legend(fontsize=8)
    fig.suptitle(f"Held-out accuracy with 95% intervals: {n} problems, k = {k}, {mode} grading")
    fig.tight_layout()
    return fig


def divergence_html(view, *, vmax: float | None = None) -> str:
    """The rollout's tokens as HTML, each shaded by the teacher's disagreement D(p_T || p_S)."""
    top = vmax or max(max(view.values, default=0.0), 1e-9)
    spans = []
    for token, value in zip(view.tokens, view.values):
        alpha = min(1.0, max(0.0, value / top))
        spans.append(f'<span title="{value:.3f}" style="background: rgba(220,50,47,{alpha:.2f})">'
                     f"{html.escape(token)}</span>")
    return (f"<div style='font-family: monospace; white-space: pre-wrap'><b>{html.escape(view.problem_id)}"
            f"</b> ({view.kind}, darker = teacher disagrees more)<br>{''.join(spans)}</div>")


def divergence_bars(view, *, top: int = 15):
    """Bar chart of the tokens the teacher disagrees with most."""
    import matplotlib.pyplot as plt

    order = sorted(range(len(view.values)), key=lambda i: -view.values[i])[:top]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(order) + 1))
    labels = [f"{i}: {view.tokens[i]!r}" for i in order]
    ax.barh(labels[::-1], [view.values[i] for i in order][::-1], color="tab:red")
    ax.set_xlabel(f"per-token {view.kind}")
    ax.set_title("tokens the teacher disagrees with most")
    fig.tight_layout()
    return fig
