"""``--tensorboard``: TensorBoard event files of a run's rounds in ``<run folder>/tensorboard/``."""

from __future__ import annotations

from pathlib import Path

from fedlora_ext.errors import RunError

TENSORBOARD_MISSING = '--tensorboard needs the tensorboard package: pip install "fedlora_ext[tensorboard]"'


def summary_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``; RunError (one line) without the tensorboard package."""
    try:
        import tensorboard  # noqa: F401 - torch.utils.tensorboard needs it
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RunError(TENSORBOARD_MISSING) from None
    return SummaryWriter


def round_scalars(metrics: dict) -> dict[str, float]:
    """TensorBoard's scalars of a round: every number of its metrics.jsonl line but ``round`` (the step)."""
    return {key: float(value) for key, value in metrics.items()
            if key != "round" and isinstance(value, (int, float)) and not isinstance(value, bool)}


class TensorBoardRounds:
    """Event files in ``<run folder>/tensorboard/``: :func:`round_scalars` of each round at step = round,
    flushed every round. The writer starts at the first round; a resumed run adds an event file to the
    folder, purging what a killed run logged after its last checkpoint (``purge_step``)."""

    def __init__(self, run_folder: str | Path) -> None:
        self.folder = Path(run_folder) / "tensorboard"
        self.writer = None

    def __call__(self, metrics: dict) -> None:
        if self.writer is None:
            first = int(metrics["round"])
            self.writer = summary_writer_class()(log_dir=str(self.folder), purge_step=first if first > 1 else None)
        for tag, value in round_scalars(metrics).items():
            self.writer.add_scalar(tag, value, int(metrics["round"]))
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def board_for(out: Path | None, tensorboard: bool, *, resumed: bool, echo) -> TensorBoardRounds | None:
    """The run's TensorBoard writer: asked for, or a resumed run whose folder has event files."""
    if out is None:
        return None
    if not tensorboard and resumed and (out / "tensorboard").is_dir():
        try:
            summary_writer_class()
        except RunError:
            echo("  note: tensorboard/ is not continued: the tensorboard package is not installed")
            return None
        tensorboard = True
    return TensorBoardRounds(out) if tensorboard else None


def with_board(on_round, board: TensorBoardRounds | None):
    if board is None:
        return on_round

    def both(metrics: dict) -> None:
        on_round(metrics)
        board(metrics)

    return both
