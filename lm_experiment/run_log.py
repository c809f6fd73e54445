"""What a training run leaves for people and tools to read: metrics.jsonl, TensorBoard events, a progress
bar, and JSON reports written atomically.

  ``{workdir}/metrics.jsonl``      one JSON object per logged step, appended and flushed line by line
  ``{workdir}/tensorboard/``       event files with the same scalars (no TensorFlow needed to write them)

A resumed run continues both from its checkpoint's step: lines of steps after it (written by the
interrupted run before it stopped) are dropped from metrics.jsonl, and TensorBoard is told to purge its
events after that step, so every step appears once. Only process 0 writes (``enabled=False`` elsewhere).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tqdm import tqdm

from sparse_attention.atomic_io import atomic_open

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """The logged steps of a run, in order."""
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunLog:
    """metrics.jsonl + TensorBoard scalars + a tqdm progress bar for one invocation of a run.

    ``start_step``: the step the run resumes from (0 for a fresh run); ``total_steps``: where it ends.
    """

    def __init__(self, workdir: str | os.PathLike, *, start_step: int, total_steps: int,
                 enabled: bool = True):
        self.enabled = enabled
        self._metrics = None
        self._events = None
        self._bar = None
        if not enabled:
            return
        workdir = Path(workdir)
        metrics_path = workdir / METRICS_FILE
        kept = [m for m in read_metrics(workdir) if m["step"] <= start_step]
        if metrics_path.exists():
            _rewrite_lines(metrics_path, kept)
        self._metrics = open(metrics_path, "a")
        self._events = EventFileWriter(str(workdir / TENSORBOARD_DIR))
        if start_step > 0:
            # TensorBoard drops earlier events at steps >= this one: those of the interrupted run.
            self._events.add_event(event_pb2.Event(
                wall_time=time.time(), step=start_step + 1,
                session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
        # In a log file (a batch job's stderr) a redraw every 0.1 s would be a line every 0.1 s.
        self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                         smoothing=0.1, mininterval=0.1 if sys.stderr.isatty() else 30.0)

    def log(self, metrics: Mapping[str, float | int]) -> None:
        """One logged step: ``metrics`` holds ``step`` and finite float values."""
        if not self.enabled:
            return
        step = int(metrics["step"])
        # One write per line, then flush: a reader (or a crash) never sees half a line.
        self._metrics.write(json.dumps(dict(metrics), allow_nan=False) + "\n")
        self._metrics.flush()
        values = [summary_pb2.Summary.Value(tag=key, simple_value=float(value))
                  for key, value in metrics.items() if key != "step"]
        self._events.add_event(event_pb2.Event(wall_time=time.time(), step=step,
                                                summary=summary_pb2.Summary(value=values)))
        self._events.flush()

    def progress(self, step: int, loss: float, tokens_per_sec: float) -> None:
        """Moves the progress bar to ``step`` (it shows the ETA) with the latest loss and throughput."""
        if not self.enabled:
            return
        self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_sec:,.0f}", refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if not self.enabled:
            return
        self._bar.close()
        self._metrics.close()
        self._events.close()


def _rewrite_lines(path: Path, records: list[dict]) -> None:
    with atomic_open(path, "w") as out:
        out.writelines(json.dumps(r, allow_nan=False) + "\n" for r in records)
