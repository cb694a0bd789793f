"""04: the loss plot (train vs val per epoch, best epoch marked, overfitting shaded) and its table."""

from .checkpoints import atomic_file, best_epoch, read_json
from .console import UserError, log


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


def plot_loss(cp, show: bool = False) -> None:
    import matplotlib

    if not show:
        matplotlib.use("Agg")  # draw to a file: no window, works headless, never blocks
    import matplotlib.pyplot as plt

    metrics = load_metrics(cp)
    epochs = metrics["epochs"]
    best = best_epoch(epochs)
    xs = [e["epoch"] for e in epochs]
    fig, (ax_loss, ax_acc) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True,
                                          gridspec_kw={"height_ratios": [2, 1]})
    ax_loss.plot(xs, [e["train_loss"] for e in epochs], "o-", label="train loss")
    ax_loss.plot(xs, [e["val_loss"] for e in epochs], "s-", label="validation loss")
    for ax in (ax_loss, ax_acc):
        ax.axvline(best, color="tab:green", linestyle="--", linewidth=1)
        if best < xs[-1]:
            ax.axvspan(best, xs[-1], color="tab:red", alpha=0.08)
        ax.grid(alpha=0.3)
    best_val = next(e["val_loss"] for e in epochs if e["epoch"] == best)
    ax_loss.plot([best], [best_val], "*", color="tab:green", markersize=16,
                 label=f"best epoch {best} (val {best_val:.3f})")
    if best < xs[-1]:
        ax_loss.plot([], [], color="tab:red", alpha=0.2, linewidth=8, label="after best: overfitting")
    ax_loss.set_ylabel("loss (answer tokens)")
    ax_loss.set_title("LoRA fine-tuning: train vs validation loss")
    ax_loss.legend()
    ax_acc.plot(xs, [e["val_accuracy"] for e in epochs], "d-", color="tab:purple", label="val accuracy")
    ax_acc.set_ylim(-0.05, 1.05)
    ax_acc.set_ylabel("val accuracy\n(exact emoji)")
    ax_acc.set_xlabel("epoch")
    ax_acc.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.tight_layout()
    with atomic_file(cp.loss_plot) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    log(table(epochs, best))
    log(f"wrote {cp.loss_plot}")
    if show:
        plt.show()
    plt.close(fig)
