"""What a run shows and leaves behind: progress bar, ``trainer_log.jsonl``, TensorBoard, ``training_loss.png``,
``config.yaml`` and ``versions.json``. Only the main process writes or prints.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from tunesmith.config import Config, dump_config
from tunesmith.logging import get_logger, is_main_process

log = get_logger("train")

LOG_FILE = "trainer_log.jsonl"
PLOT_FILE = "training_loss.png"
VERSIONS_FILE = "versions.json"
CONFIG_FILE = "config.yaml"


def library_versions() -> dict[str, str]:
    from tunesmith.envinfo import library_versions as versions

    info = versions()
    return {key: info[key] for key in ("python", "torch", "transformers", "peft", "tunesmith") if key in info}


def write_run_info(output_dir: Path, cfg: Config) -> None:
    """The resolved config (re-runnable with ``tunesmith train config.yaml``) and the library versions."""
    if not is_main_process():
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / CONFIG_FILE).write_text(dump_config(cfg), encoding="utf-8")
    (output_dir / VERSIONS_FILE).write_text(json.dumps(library_versions(), indent=1) + "\n", encoding="utf-8")


def read_log(output_dir: Path) -> list[dict[str, Any]]:
    path = Path(output_dir) / LOG_FILE
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    return entries


class RunObserver:
    """Receives log entries from the loop and fans them out; ``close()`` at the end (also on errors)."""

    def __init__(
        self,
        output_dir: Path,
        total_steps: int,
        initial_step: int = 0,
        tensorboard_dir: Path | None = None,
        enabled: bool | None = None,
    ) -> None:
        self.enabled = is_main_process() if enabled is None else enabled
        self.output_dir = Path(output_dir)
        self.log_path = self.output_dir / LOG_FILE
        self.writer = None
        self.bar = None
        if not self.enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_log(initial_step)
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops the events a killed run wrote after the checkpoint we resume from
            purge = initial_step + 1 if initial_step else None
            self.writer = SummaryWriter(log_dir=str(tensorboard_dir), purge_step=purge)
        self.bar = tqdm(
            total=total_steps,
            initial=initial_step,
            desc="train",
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=0.5,
        )

    def _truncate_log(self, step: int) -> None:
        """On resume keep only the entries up to the checkpoint's step (a killed run may have logged past it)."""
        if not self.log_path.exists():
            return
        kept = [e for e in read_log(self.output_dir) if e.get("step", 0) <= step] if step else []
        with self.log_path.open("w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(e) + "\n" for e in kept)

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def log(self, entry: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.log_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
        step = entry["step"]
        if self.writer is not None:
            for key, value in entry.items():
                if key in ("step", "elapsed") or not isinstance(value, int | float):
                    continue
                tag = "eval/loss" if key == "eval_loss" else f"train/{key}"
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()
        if self.bar is not None:
            if "loss" in entry:
                self.bar.set_postfix(
                    loss=f"{entry['loss']:.4f}",
                    lr=f"{entry['lr']:.2e}",
                    tok_s=f"{entry['tokens_per_s']:.0f}",
                    refresh=False,
                )
            else:
                self.bar.write(
                    f"[tunesmith] step {step}: eval_loss {entry['eval_loss']:.4f}", file=sys.stderr
                )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def plot_loss(output_dir: Path) -> Path | None:
    """``training_loss.png``: train loss per logged step (and eval loss when there is some)."""
    if not is_main_process():
        return None
    entries = read_log(output_dir)
    train = [(e["step"], e["loss"]) for e in entries if "loss" in e]
    evals = [(e["step"], e["eval_loss"]) for e in entries if "eval_loss" in e]
    if not train:
        log.warning("plot_loss: no logged loss to plot")
        return None
    # Figure + the Agg canvas directly: no pyplot, so no global backend switch and no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(*zip(*train, strict=True), label="train loss", color="#1f77b4", alpha=0.9)
    if evals:
        ax.plot(*zip(*evals, strict=True), label="eval loss", color="#ff7f0e", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"training loss of {Path(output_dir).resolve().name}")
    ax.legend()
    ax.grid(alpha=0.3)
    path = Path(output_dir) / PLOT_FILE
    fig.savefig(path)
    return path
