"""How training reports: the callback protocol, the fan-out the trainer calls, and the console.

The trainer prints nothing itself; `train()` installs `ConsoleCallback` on the main rank
beside whatever the caller passes (MLflow's callback: ferflow.tracking.runs).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Protocol, Sequence

from ferflow.layout import LAST

if TYPE_CHECKING:
    from ferflow.training.loop import TrainResult


class TrainCallback(Protocol):
    """What every callback implements; training itself knows nothing of who listens."""

    def on_train_start(self, info: dict) -> None: ...
    def on_epoch_end(self, record: dict) -> None: ...  # the epoch is saved (history, last.pt)
    def on_train_end(self, result: "TrainResult") -> None: ...


class EpochCallback(TrainCallback, Protocol):
    """Finer hooks, each optional (a callback implements those it needs)."""

    def on_epoch_start(self, epoch: int, stage: str, steps: int) -> None: ...
    def on_step_end(self, loss: float, accuracy: float, images_per_s: float) -> None: ...  # epoch so far
    def on_validation_start(self) -> None: ...  # the epoch's training steps are done
    # The epoch's record, before it is checked and saved: a diverged epoch is reported too.
    def on_validation_end(self, record: dict) -> None: ...


OPTIONAL_HOOKS = ("on_epoch_start", "on_step_end", "on_validation_start", "on_validation_end")


class CallbackList:
    """Fans each event out to the callbacks in order; optional hooks go only to those that have them."""

    def __init__(self, callbacks: Sequence[TrainCallback] = ()):
        self.callbacks = list(callbacks)
        # Looked up once: on_step_end runs every step.
        self.hooks = {name: [hook for cb in self.callbacks if (hook := getattr(cb, name, None)) is not None]
                      for name in OPTIONAL_HOOKS}

    def on_train_start(self, info: dict) -> None:
        for cb in self.callbacks:
            cb.on_train_start(info)

    def on_epoch_end(self, record: dict) -> None:
        for cb in self.callbacks:
            cb.on_epoch_end(record)

    def on_train_end(self, result: "TrainResult") -> None:
        for cb in self.callbacks:
            cb.on_train_end(result)

    def on_epoch_start(self, epoch: int, stage: str, steps: int) -> None:
        for hook in self.hooks["on_epoch_start"]:
            hook(epoch, stage, steps)

    def on_step_end(self, loss: float, accuracy: float, images_per_s: float) -> None:
        for hook in self.hooks["on_step_end"]:
            hook(loss, accuracy, images_per_s)

    def on_validation_start(self) -> None:
        for hook in self.hooks["on_validation_start"]:
            hook()

    def on_validation_end(self, record: dict) -> None:
        for hook in self.hooks["on_validation_end"]:
            hook(record)


class ConsoleCallback:
    """stderr: the resume notice, one line per epoch, and a progress bar on a terminal.

    Logging is quiet by default, so these are prints: a resume and each epoch must be visible.
    """

    def __init__(self) -> None:
        self.bar = None

    def on_train_start(self, info: dict) -> None:
        epoch = info["resumed_from_epoch"]
        if epoch:
            _print(f"resuming {info['run_dir']} after epoch {epoch}: epochs 1-{epoch} are restored from {LAST}, "
                   "not trained again")

    def on_epoch_start(self, epoch: int, stage: str, steps: int) -> None:
        self.bar = _ProgressBar(f"epoch {epoch} ({stage})", steps) if sys.stderr.isatty() else None

    def on_step_end(self, loss: float, accuracy: float, images_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(f"loss {loss:.3f} acc {accuracy:.3f} {images_per_s:.0f} img/s")

    def on_validation_start(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_validation_end(self, record: dict) -> None:
        val = f"val loss {record['val_loss']:.4f} acc {record['val_accuracy']:.3f} f1 {record['val_macro_f1']:.3f}"
        if record["stage"] == "start":  # epoch 0: the mapped head before any update
            _print(f"epoch {record['epoch']:>3} start | {val}")
        else:
            _print(f"epoch {record['epoch']:>3} {record['stage']:<4} loss {record['train_loss']:.4f} "
                   f"acc {record['train_accuracy']:.3f} | {val} | {record['images_per_s']:.0f} img/s")

    def on_epoch_end(self, record: dict) -> None:
        pass

    def on_train_end(self, result: "TrainResult") -> None:
        pass


def _print(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class _ProgressBar:
    """A transient rich progress bar (only made on a terminal)."""

    def __init__(self, title: str, total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn(title), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                            TimeRemainingColumn(), transient=True)
        self.bar.start()
        self.task = self.bar.add_task(title, total=total, info="")

    def update(self, info: str) -> None:
        self.bar.update(self.task, advance=1, info=info)

    def close(self) -> None:
        self.bar.stop()
