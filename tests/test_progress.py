"""Training progress lines: a real Lightning trainer, with time driven by the steps so the rate limits are exact."""

from __future__ import annotations

import io
import re

import lightning.pytorch as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from workflows.progress import ProgressLines

SECONDS_PER_STEP = 1.5


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/psnr", torch.tensor(20.0 + self.global_step / 10))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Clock(L.Callback):
    """Fake monotonic time: each training batch takes SECONDS_PER_STEP."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.now += SECONDS_PER_STEP


class Stamped(io.StringIO):
    """Records the fake time of every line written."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock, self.lines = clock, []

    def write(self, text: str) -> int:
        if text.strip():
            self.lines.append((self.clock.now, text.strip()))
        return len(text)


def _fit(steps: int, val_every: int, every_s: float) -> list[tuple[float, str]]:
    data = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    clock = Clock()
    out = Stamped(clock)
    progress = ProgressLines("train", steps, samples_per_step=8, every_s=every_s, clock=clock, out=out)
    trainer = L.Trainer(max_steps=steps, val_check_interval=val_every, check_val_every_n_epoch=None,
                        callbacks=[clock, progress], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        accelerator="cpu", limit_val_batches=1)  # fmt: skip
    trainer.fit(Tiny(), DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    return out.lines


@pytest.mark.parametrize("val_every", [3, 40])
def test_lines_come_between_every_5_and_every_30_seconds(val_every):
    lines = _fit(steps=60, val_every=val_every, every_s=10.0)
    times = [t for t, _ in lines]
    gaps = [b - a for a, b in zip(times[:-1], times[1:-1], strict=False)]  # the end line comes whenever it ends
    assert gaps and all(5 <= g <= 30 for g in gaps), gaps
    assert len(lines) >= 60 * SECONDS_PER_STEP / 30  # at least every 30 s over the whole run


def test_a_line_says_step_loss_psnr_rate_and_eta():
    lines = [text for _, text in _fit(steps=40, val_every=10, every_s=10.0)]
    pattern = r"train: step (\d+)/40 \(\d+%\) loss [\d.e-]+( val/psnr [\d.]+)? \| ([\d.]+) samples/s, ETA (\d+) s"
    parsed = [re.fullmatch(pattern, line) for line in lines]
    assert all(parsed), lines
    assert parsed[-1].group(1) == "40" and parsed[-1].group(4) == "0"  # the end line
    assert any(p.group(2) for p in parsed)  # validation PSNR shows once there is one
    rate = float(parsed[1].group(3))
    assert rate == pytest.approx(8 / SECONDS_PER_STEP, rel=0.15)  # 8 samples per 1.5 s step
    step, eta = int(parsed[1].group(1)), int(parsed[1].group(4))
    assert eta == pytest.approx((40 - step) * SECONDS_PER_STEP, abs=2)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="every_s > 0"):
        ProgressLines("x", 0, 8)


@pytest.mark.parametrize("val_every", [10, 40])
def test_the_end_line_is_not_a_repeat_of_the_last_one(val_every):
    """Every batch prints here (1.5 s a step, a line every 1 s): the end adds a line only when a validation after
    the last batch's line changed what it says (its PSNR)."""
    lines = _fit(steps=20, val_every=val_every, every_s=1.0)
    heads = [line.split(" |")[0] for _, line in lines]
    assert len(heads) == len(set(heads)), heads
    assert heads[-1].startswith("train: step 20/20") and ("val/psnr" in heads[-1]) == (val_every == 10)
