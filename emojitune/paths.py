"""The checkpoint-directory layout: every file the numbered scripts share, defined once."""

from pathlib import Path


class CheckpointDir:
    def __init__(self, root):
        self.root = Path(root)

    # 01 / 02: data
    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def prepared(self) -> Path:
        return self.data_dir / "prepared.json"

    @property
    def train(self) -> Path:
        return self.data_dir / "train.json"

    @property
    def val(self) -> Path:
        return self.data_dir / "val.json"

    @property
    def split_info(self) -> Path:
        return self.data_dir / "split.json"

    # 03: training run
    @property
    def run_info(self) -> Path:
        return self.root / "run.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def epochs_dir(self) -> Path:
        return self.root / "epochs"

    def epoch_dir(self, epoch: int) -> Path:
        return self.epochs_dir / f"epoch-{epoch}"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def resume_state(self) -> Path:
        # Optimizer, scheduler and RNG state of the last finished epoch, for --resume.
        return self.root / "resume.pt"

    # 04 / 05
    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"

    @property
    def eval_base(self) -> Path:
        return self.root / "eval_base.json"

    @property
    def eval_compare(self) -> Path:
        return self.root / "eval_compare.json"

    # 07
    @property
    def export_dir(self) -> Path:
        return self.root / "export"

    def has_trained_adapter(self) -> bool:
        return self.adapter.exists() or any(self.epochs_dir.glob("epoch-*"))

    def training_outputs(self) -> list[Path]:
        """Everything 03 writes, and what 04/05/07 made from it; what --overwrite clears before a new run."""
        return [self.run_info, self.metrics, self.epochs_dir, self.adapter, self.resume_state, self.loss_plot,
                self.eval_base, self.eval_compare, self.export_dir]

