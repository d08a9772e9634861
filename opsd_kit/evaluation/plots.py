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
    rewards (GRPO: 0 means no signal), rollout correctness in the run's `grading_mode` (not its
    reward), and cumulative tokens per step."""
    import matplotlib.pyplot as plt

    panels = [("loss/total", "loss"), ("loss/divergence_mean", "mean per-token divergence"),
              ("loss/sft", "SFT loss (sft_weight)"), ("grpo/reward_mean", "mean reward"),
              ("grpo/mixed_groups", "groups with mixed rewards"),
              ("rollout/correct", "rollouts correct (grading_mode)"),
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
    (crosses), with the ratio and its interval in the panel's title, or why it is undefined (with
    the bound, target and crossing when only one method improved).
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
        defined = ratio.get("ratio") is not None
        if defined or ratio.get("bound"):  # the target and where each method's curve first reached it
            target = ratio["target_accuracy"]
            gain = "the smaller gain" if defined else "the gain of the one that improved"
            ax_tokens.axhline(target, color="black", ls=":", lw=1,
                              label=f"target: base + {ratio.get('target_fraction', 1.0):.0%} of {gain}")
            for m in (a, b):
                if ratio.get(f"tokens_{m}") is not None:
                    ax_tokens.plot([ratio[f"tokens_{m}"]], [target], marker="X", ms=9,
                                   color=color_of.get(m, "black"), ls="none")
        if defined:
            interval = ""
            if ratio.get("ci_low") is not None:
                interval = (f" [95% CI {ratio['ci_low']:.3g}, {ratio['ci_high']:.3g}; defined in "
                            f"{100 * ratio['defined_fraction']:.0f}% of resamples]")
            title = (f"{b} needs {ratio['ratio']:.3g}x{interval} the rollout tokens of {a} "
                     f"to first reach {ratio['target_accuracy']:.3f}")
        else:
            title = f"tokens-to-equal-accuracy undefined: {ratio.get('reason', '')}"
    ax_tokens.set_title(textwrap.fill(title, 70), fontsize=9)
    ax_time.set_title("all methods (SFT generates no rollout tokens)", fontsize=9)
    ax_tokens.legend(fontsize=8)
    ax_time.legend(fontsize=8)
    fig.suptitle(f"Held-out accuracy with 95% intervals: {n} problems, k = {k}, {mode} grading")
    fig.tight_layout()
    return fig


#: The shade of the per-token view: red, its opacity the token's share of the largest divergence shown.
_SHADE = (220, 50, 47)
#: How the per-token view shows whitespace where it must be seen (a teacher token; the figure).
_VISIBLE = str.maketrans({" ": "\u2423", "\n": "\u21b5", "\t": "\u2192"})


def _printable(text: str) -> str:
    """``text`` with control characters other than newline and tab written as ``\\xNN`` (a byte-level
    tokenizer's token may be one; neither HTML nor a font shows it)."""
    return "".join(c if c in "\n\t" or c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def _visible(text: str) -> str:
    return _printable(text).translate(_VISIBLE)


def _shared_top(views, vmax: float | None) -> float:
    """One scale for every view shown together, so that equal shades mean equal divergence."""
    return vmax or max([max(v.values, default=0.0) for v in views] + [1e-9])


def _differs(view, i: int) -> bool:
    return view.teacher_tokens is not None and view.teacher_tokens[i] != view.tokens[i]


def token_view_table(views):
    """The per-token numbers behind `token_view_html` and `token_view_figure`, one row per token:
    ``view`` (label), ``problem_id``, ``position``, ``token`` (the student's), ``teacher_token``
    (the teacher's most likely), ``differs`` and ``divergence`` (``kind``)."""
    import pandas as pd

    rows = [{"view": v.label, "problem_id": v.problem_id, "kind": v.kind, "position": i, "token": token,
             "teacher_token": None if v.teacher_tokens is None else v.teacher_tokens[i],
             "differs": _differs(v, i), "divergence": value}
            for v in views for i, (token, value) in enumerate(zip(v.tokens, v.values))]
    return pd.DataFrame(rows)


def token_view_html(views, *, vmax: float | None = None) -> str:
    """Rollouts side by side as HTML: each completion's text with every token shaded by the
    teacher-student divergence D(p_T || p_S) at it (one scale for all, `_shared_top`; the value
    on hover) and, where the teacher's most likely token differs from the student's, the
    teacher's in a small box after it (whitespace shown as a visible mark). Tokens are escaped,
    control characters written as ``\\xNN``; their whitespace is kept (``white-space: pre-wrap``)."""
    views = list(views)
    top = _shared_top(views, vmax)
    r, g, b = _SHADE
    columns = []
    for view in views:
        spans = []
        for i, (token, value) in enumerate(zip(view.tokens, view.values)):
            alpha = min(1.0, max(0.0, value / top))
            title = f"{view.kind} {value:.3f}"
            marker = ""
            if _differs(view, i):
                teacher = view.teacher_tokens[i]
                title += f"; teacher's most likely: {teacher!r}"
                marker = (f'<span class="opsd-teacher" style="font-size: 70%; color: #1f4e9c; border: 1px solid '
                          f'#1f4e9c; border-radius: 2px; margin: 0 1px">{html.escape(_visible(teacher))}</span>')
            spans.append(f'<span class="opsd-token" title="{html.escape(title)}" style="background: '
                         f'rgba({r},{g},{b},{alpha:.2f})">{html.escape(_printable(token))}</span>{marker}')
        mean = sum(view.values) / max(1, len(view.values))
        columns.append(f'<div style="flex: 1 1 0; min-width: 16em; border: 1px solid #ccc; padding: 6px">'
                       f"<div><b>{html.escape(view.label or view.problem_id)}</b></div>"
                       f'<div style="font-size: 80%; color: #555">problem {html.escape(view.problem_id)}, '
                       f"{len(view.tokens)} tokens, mean {html.escape(view.kind)} {mean:.3f}</div>"
                       f'<div style="font-family: monospace; white-space: pre-wrap; line-height: 1.6">'
                       f'{"".join(spans)}</div></div>')
    legend = (f'<div style="font-size: 80%">Shade: the per-token divergence, darkest = {top:.3f} or more; '
              'boxed: the teacher\'s most likely token where it differs from the student\'s.</div>')
    return f'<div class="opsd-token-view">{legend}<div style="display: flex; gap: 8px">{"".join(columns)}</div></div>'


def token_view_figure(views, *, vmax: float | None = None, width: int = 48, max_tokens: int = 400):
    """`token_view_html` as a figure (for the run folder): one panel per view, the completion's
    text laid out in a monospace grid of ``width`` characters, each token on a red background of
    the divergence's share of the largest shown, the teacher's most likely token in blue under a
    token where it differs. At most ``max_tokens`` tokens per view (the panel says when cut)."""
    import matplotlib.pyplot as plt

    views = list(views)
    top = _shared_top(views, vmax)
    laid_out = [_layout(v, width, max_tokens) for v in views]
    rows = max([1] + [max((y for _, y, *_ in cells), default=0) + 1 for cells in laid_out])
    # inches: a monospace character is 0.6 em wide, so a panel of `width` characters fits its text
    char, row, gap, head, foot = 0.6 * 8 / 72, 0.3, 0.3, 0.9, 0.1
    panel_w, panel_h = width * char, rows * row
    fig = plt.figure(figsize=(len(views) * (panel_w + gap) + gap, head + panel_h + foot))
    fig_w, fig_h = fig.get_size_inches()
    for k, (view, cells) in enumerate(zip(views, laid_out)):
        ax = fig.add_axes(((gap + k * (panel_w + gap)) / fig_w, foot / fig_h, panel_w / fig_w, panel_h / fig_h))
        ax.set_xlim(0, width)
        ax.set_ylim(rows - 0.4, -0.6)
        ax.axis("off")
        cut = f", first {max_tokens} of {len(view.tokens)} tokens" if len(view.tokens) > max_tokens else ""
        ax.set_title(f"{view.label or view.problem_id}\n(problem {view.problem_id}, {view.kind}{cut})", fontsize=9)
        for x, y, text, value, teacher in cells:
            alpha = min(1.0, max(0.0, value / top))
            ax.add_patch(plt.Rectangle((x, y - 0.3), max(len(text), 1), 0.6, color=[c / 255 for c in _SHADE],
                                       alpha=alpha, lw=0))
            ax.text(x, y, text, fontsize=8, family="monospace", va="center", ha="left", parse_math=False)
            if teacher is not None:
                ax.text(x, y + 0.42, teacher, fontsize=6, family="monospace", va="center", ha="left",
                        color="#1f4e9c", parse_math=False)
    fig.suptitle(f"per-token divergence (darkest = {top:.3f} or more); blue: the teacher's most likely token "
                 "where it differs", fontsize=9, y=1 - 0.1 / fig_h, va="top")
    return fig


def _layout(view, width: int, max_tokens: int) -> list[tuple]:
    """``(x, y, text, value, teacher or None)`` per token: a monospace grid of ``width``
    characters, a new row after a newline and where a token would cross the edge; whitespace
    drawn as visible marks (a newline as its mark at the end of its row)."""
    cells, x, y = [], 0, 0
    for i, (token, value) in enumerate(zip(view.tokens[:max_tokens], view.values[:max_tokens])):
        text = _visible(token) or "\u2205"
        if x + len(text) > width and x > 0:
            x, y = 0, y + 1
        teacher = _visible(view.teacher_tokens[i]) if _differs(view, i) else None
        cells.append((x, y, text[:width], value, teacher))
        x += len(text)
        if "\n" in token:
            x, y = 0, y + 1
    return cells
