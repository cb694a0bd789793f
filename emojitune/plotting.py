"""04: the loss plot (the train-loss curve, validation at every evaluation, best epoch marked, overfitting
shaded, accuracy below) and its table; --compare overlays the validation curves of several runs."""

import math
import os
import sys
from pathlib import Path

from .checkpoints import CheckpointDir, atomic_file, best_epoch, read_json
from .console import UserError, log, warn
from .data import display_width

# matplotlib backends that draw only to files: with one of these, --show cannot open a window.
FILE_ONLY_BACKENDS = {"agg", "cairo", "pdf", "pgf", "ps", "svg", "template"}


def load_metrics(cp) -> dict:
    metrics = read_json(cp.metrics, "run 03_train_model.py first")
    epochs = metrics.get("epochs") if isinstance(metrics, dict) else None
    keys = ("epoch", "train_loss", "val_loss", "val_accuracy")
    if not epochs or not all(isinstance(e, dict) and all(k in e for k in keys) for e in epochs):
        raise UserError(f"{cp.metrics} has no finished epochs with {', '.join(keys)}: "
                        "run 03_train_model.py (at least one epoch) first")
    return metrics


def table(epochs: list[dict], best: int) -> str:
    lines = ["epoch  train loss  val loss  val acc"]
    for e in epochs:
        mark = "  ← best (lowest val loss)" if e["epoch"] == best else ""
        lines.append(f"{e['epoch']:>5}  {e['train_loss']:>10.4f}  {e['val_loss']:>8.4f}  {e['val_accuracy']:>7.2f}{mark}")
    return "\n".join(lines)


def train_points(metrics: dict) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(x in epochs, train loss): the --log-every points, and the epoch means of the epochs that have none
    (a metrics.json written before the curve existed, or the epochs of a run resumed from one)."""
    steps = [(s["epoch"], s["train_loss"]) for s in metrics.get("steps") or []]
    covered = {math.ceil(x) for x, _ in steps}  # the epoch a point lies in: (E - 1, E]
    means = [(e["epoch"], e["train_loss"]) for e in metrics["epochs"] if e["epoch"] not in covered]
    return steps, means


def val_points(metrics: dict) -> list[tuple[float, float, float]]:
    """(x in epochs, val loss, val accuracy) of every evaluation; the end-of-epoch ones come from
    `epochs` too, so older files (no `evals`) give one point per epoch."""
    points = {round(e["epoch"], 9): (e["val_loss"], e["val_accuracy"]) for e in metrics["epochs"]}
    for e in metrics.get("evals") or []:
        points[round(e["epoch"], 9)] = (e["val_loss"], e["val_accuracy"])
    return [(x, loss, acc) for x, (loss, acc) in sorted(points.items())]


def smoothed(ys: list[float], window: int) -> list[float]:
    """A centred moving average (narrower at the ends), so the smooth line does not lag the raw points."""
    half = window // 2
    return [sum(ys[max(0, i - half):i + half + 1]) / len(ys[max(0, i - half):i + half + 1]) for i in range(len(ys))]


def smoothing_window(n_points: int, n_epochs: float) -> int:
    """About a quarter epoch of points, and at least 1/25 of the run: a trend for 1 epoch or 30. Odd, so
    the window is centred on its point."""
    per_epoch = n_points / max(n_epochs, 1e-9)
    window = max(1, round(per_epoch / 4), round(n_points / 25))
    return window if window % 2 else window + 1


def _pyplot(show: bool):
    import matplotlib

    if not show:
        matplotlib.use("Agg")  # draw to a file: no window, works headless, never blocks
    import matplotlib.pyplot as plt

    return matplotlib, plt


def _epoch_axis(matplotlib, ax, last: float) -> None:
    ax.set_xlim(0, last * 1.02 if last > 0 else 1)
    if last > 3:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    else:  # short runs: fractions of an epoch, where the evaluations are
        ax.xaxis.set_major_locator(matplotlib.ticker.MultipleLocator(0.25 if last <= 1.5 else 0.5))


def plot_loss(cp, show: bool = False) -> None:
    matplotlib, plt = _pyplot(show)
    metrics = load_metrics(cp)
    epochs = metrics["epochs"]
    best = best_epoch(epochs)
    steps, means = train_points(metrics)
    vals = val_points(metrics)
    last = max([x for x, *_ in vals] + [x for x, _ in steps])

    fig, (ax_loss, ax_acc) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True,
                                          gridspec_kw={"height_ratios": [2, 1]})
    if steps:
        xs, ys = zip(*steps)
        window = smoothing_window(len(ys), xs[-1] - (math.ceil(xs[0]) - 1))
        if window > 1:  # raw points faint, the trend over them
            ax_loss.plot(xs, ys, ".-", color="tab:blue", alpha=0.2, markersize=3, linewidth=0.6,
                         label=_train_label(metrics))
            ax_loss.plot(xs, smoothed(list(ys), window), "-", color="tab:blue", linewidth=2,
                         label=f"train loss, smoothed ({window} points)")
        else:  # too few points to smooth
            ax_loss.plot(xs, ys, ".-", color="tab:blue", label=_train_label(metrics))
    if means:
        xs, ys = zip(*means)
        ax_loss.plot(xs, ys, "o-", color="tab:blue", label="train loss (epoch mean)")
    vx, vloss, vacc = zip(*vals)
    few = len(vals) <= 40
    ax_loss.plot(vx, vloss, "s-" if few else "-", color="tab:orange", markersize=4, label="validation loss")
    ends = [(e["epoch"], e["val_loss"], e["val_accuracy"]) for e in epochs]
    if len(vals) > len(ends):  # mark the end-of-epoch evaluations, the ones that pick the best epoch
        ax_loss.plot([x for x, *_ in ends], [y for _, y, _ in ends], "s", color="tab:orange", markersize=5)

    lowest_x = min(vals, key=lambda v: (v[1], v[0]))[0]
    for ax in (ax_loss, ax_acc):
        ax.axvline(best, color="tab:green", linestyle="--", linewidth=1)
        if lowest_x < vx[-1]:
            ax.axvspan(lowest_x, vx[-1], color="tab:red", alpha=0.08)
        ax.grid(alpha=0.3)
    best_val = next(e["val_loss"] for e in epochs if e["epoch"] == best)
    ax_loss.plot([best], [best_val], "*", color="tab:green", markersize=16,
                 label=f"best epoch {best} (val {best_val:.3f})")
    if lowest_x < vx[-1]:
        ax_loss.plot([], [], color="tab:red", alpha=0.2, linewidth=8,
                     label=f"val loss above its minimum (epoch {lowest_x:g}): overfitting")
    ax_loss.set_ylabel("loss per answer token")
    # The first steps' loss can be many times the rest: let it leave the top rather than flatten the curves.
    train_ys = sorted(y for _, y in steps + means)
    top = max(max(vloss), train_ys[int(0.9 * (len(train_ys) - 1))] if train_ys else 0)
    ax_loss.set_ylim(0, top * 1.15)
    title = "LoRA fine-tuning: train vs validation loss"
    if metrics.get("stopped_early"):
        title += f" (stopped early after epoch {epochs[-1]['epoch']})"
    ax_loss.set_title(title)
    ax_loss.legend(fontsize="small")
    if few:
        ax_acc.plot(vx, vacc, ".-", color="tab:purple", alpha=0.5, markersize=4, label="val accuracy, every evaluation")
    else:
        ax_acc.plot(vx, vacc, "-", color="tab:purple", alpha=0.4, linewidth=0.8, label="val accuracy, every evaluation")
    ax_acc.plot([x for x, *_ in ends], [a for *_, a in ends], "d", color="tab:purple", markersize=6,
                label="val accuracy, end of epoch")
    ax_acc.set_ylim(-0.05, 1.05)
    ax_acc.set_ylabel("val accuracy\n(exact emoji)")
    ax_acc.set_xlabel("epoch")
    ax_acc.legend(fontsize="small", loc="lower right")
    _epoch_axis(matplotlib, ax_acc, last)
    fig.tight_layout()
    with atomic_file(cp.loss_plot) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    log(table(epochs, best))
    if metrics.get("stopped_early"):
        log(f"stopped early after epoch {epochs[-1]['epoch']} (03 --early-stopping)")
    log(f"wrote {cp.loss_plot}")
    _show(plt, show, cp.loss_plot)
    plt.close(fig)


def _train_label(metrics: dict) -> str:
    steps = metrics.get("steps") or []
    return f"train loss (every {steps[1]['step'] - steps[0]['step']} steps)" if len(steps) > 1 else "train loss"


def _show(plt, show: bool, path: Path) -> None:
    """--show: open a window, or say in one line why none can open (the PNG is written either way)."""
    if not show:
        return
    import matplotlib

    backend = matplotlib.get_backend().lower()
    if backend not in FILE_ONLY_BACKENDS:
        plt.show()
        return
    if os.environ.get("MPLBACKEND", "").lower() in FILE_ONLY_BACKENDS:
        why = f"MPLBACKEND={os.environ['MPLBACKEND']} makes matplotlib draw to files only"
    elif sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        why = "this machine has no display (DISPLAY is not set: ssh without X forwarding, a container or a server)"
    else:
        why = f"matplotlib found no GUI toolkit here (backend {backend}; Tk, Qt or GTK is needed for a window)"
    warn(f"--show opened no window: {why}; open {path} instead")


# ---- --compare: several runs on one plot --------------------------------------------------------------

def run_label(name: str, settings: dict | None, differing: list[str]) -> str:
    if not settings or not differing:
        return name
    def shown(key):
        value = settings.get(key, "?")
        if key == "model" and isinstance(value, str):
            value = Path(value).name
        return f"{key.replace('_', '-')}={value:g}" if isinstance(value, float) else f"{key.replace('_', '-')}={value}"
    return f"{name} ({', '.join(shown(k) for k in differing)})"


def differing_settings(all_settings: list[dict | None]) -> list[str]:
    """The settings (from each run.json) whose values are not the same in every run."""
    known = [s for s in all_settings if s]
    keys = dict.fromkeys(k for s in known for k in s)
    return [k for k in keys if len({repr(s.get(k)) for s in known}) > 1]


def compare_table(rows: list[dict]) -> str:
    width = max(display_width(r["label"]) for r in rows + [{"label": "run"}])
    lines = ["run" + " " * (width - 3) + "  best epoch  val loss  val acc  epochs"]
    for r in rows:
        stopped = "  stopped early" if r["stopped_early"] else ""
        lines.append(f"{r['label']}{' ' * (width - display_width(r['label']))}  {r['best']:>10}  "
                     f"{r['val_loss']:>8.4f}  {r['val_accuracy']:>7.2f}  {r['epochs']:>6}{stopped}")
    return "\n".join(lines)


def plot_compare(cp: CheckpointDir, others: list[Path], show: bool = False) -> None:
    """Overlay the validation loss and accuracy of DIR and each --compare folder; write DIR/compare.png."""
    dirs = [cp] + [CheckpointDir(d) for d in others]
    problems, runs = [], []
    for d in dirs:
        try:
            metrics = load_metrics(d)
        except UserError as e:
            problems.append(str(e))
            continue
        info = read_json(d.run_info) if d.run_info.exists() else {}
        runs.append((d, metrics, info.get("settings")))
    if problems:
        raise UserError("; ".join(problems))
    names = [d.root.resolve().name for d, *_ in runs]
    if len(set(names)) < len(names):  # the same folder name in two places: show the paths as given
        names = [str(d.root) for d, *_ in runs]
    differing = differing_settings([s for *_, s in runs])

    matplotlib, plt = _pyplot(show)
    fig, (ax_loss, ax_acc) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True,
                                          gridspec_kw={"height_ratios": [2, 1]})
    rows, last = [], 0.0
    for i, ((d, metrics, settings), name) in enumerate(zip(runs, names)):
        colour = f"C{i % 10}"
        label = run_label(name, settings, differing)
        vals = val_points(metrics)
        vx, vloss, vacc = zip(*vals)
        last = max(last, vx[-1])
        marker = "." if len(vals) <= 40 else None
        ax_loss.plot(vx, vloss, marker=marker, color=colour, label=label)
        ax_acc.plot(vx, vacc, marker=marker, color=colour, alpha=0.8)
        epochs = metrics["epochs"]
        best = best_epoch(epochs)
        row = next(e for e in epochs if e["epoch"] == best)
        ax_loss.plot([best], [row["val_loss"]], "*", color=colour, markersize=14, markeredgecolor="black",
                     markeredgewidth=0.5)
        rows.append({"label": label, "best": best, "val_loss": row["val_loss"], "val_accuracy": row["val_accuracy"],
                     "epochs": epochs[-1]["epoch"], "stopped_early": bool(metrics.get("stopped_early"))})
    ax_loss.plot([], [], "*", color="grey", markersize=12, label="best epoch of each run")
    ax_loss.set_ylabel("validation loss per answer token")
    ax_loss.set_title(f"validation loss and accuracy of {len(runs)} runs")
    ax_loss.legend(fontsize="small")
    ax_acc.set_ylim(-0.05, 1.05)
    ax_acc.set_ylabel("val accuracy\n(exact emoji)")
    ax_acc.set_xlabel("epoch")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    _epoch_axis(matplotlib, ax_acc, last)
    fig.tight_layout()
    with atomic_file(cp.compare_plot) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    log(compare_table(rows))
    log(f"wrote {cp.compare_plot}")
    _show(plt, show, cp.compare_plot)
    plt.close(fig)
