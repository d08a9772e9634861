"""Matplotlib figures the notebooks show. Each returns the figure; nothing is shown or saved
unless the caller asks."""
from __future__ import annotations

import html


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
    """Loss, divergence (OPSD) or reward (GRPO), rollout correctness, and cumulative tokens per step."""
    import matplotlib.pyplot as plt

    panels = [("loss/total", "loss"), ("loss/divergence_mean", "mean per-token divergence"),
              ("grpo/reward_mean", "mean reward"), ("rollout/correct", "rollout correctness"),
              ("tokens/generated_total", "generated tokens (cumulative)"), ("time/step", "seconds per step")]
    panels = [(k, label) for k, label in panels if k in metrics.columns]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        ax.plot(metrics["step"], metrics[key], marker=".")
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def token_efficiency(points, *, mode: str, metric: str = "avg@k"):
    """Held-out accuracy against cumulative generated tokens and against wall-clock training time.

    ``points``: the DataFrame of `opsd_kit.study.evaluate_runs` (one row per method and step).
    """
    import matplotlib.pyplot as plt

    column = f"{mode}/{metric}"
    fig, (ax_tokens, ax_time) = plt.subplots(1, 2, figsize=(11, 4))
    for method, rows in points.groupby("method", sort=False):
        rows = rows.sort_values("step")
        ax_tokens.plot(rows["generated_tokens"], rows[column], marker="o", label=method)
        ax_time.plot(rows["train_seconds"], rows[column], marker="o", label=method)
    ax_tokens.set_xlabel("generated tokens during training (cumulative)")
    ax_time.set_xlabel("training wall-clock seconds")
    for ax in (ax_tokens, ax_time):
        ax.set_ylabel(f"held-out {metric} ({mode} grading)")
        ax.grid(alpha=0.3)
        ax.legend()
    ax_tokens.set_xscale("symlog", linthresh=100)
    fig.suptitle(f"Token efficiency (grading: {mode})")
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
