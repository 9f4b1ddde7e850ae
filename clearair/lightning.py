"""Lightning modules: restorer training (any network, with one of :mod:`clearair.objectives`' losses) and the
perceiver's prompt learning.

:class:`RestorerModule` takes its parts built: the network, the loss, the optimiser settings and the prior
provider. :func:`build_restorer_module` builds them from a plain :class:`clearair.specs.RestorerSpec` where the
module trains (on each Ray worker), network first, then the frozen parts, and records the spec as the module's
hyperparameters, so a checkpoint (``torch.load(path, weights_only=True)`` reads it) rebuilds the module
(:func:`restorer_module_from_checkpoint`) and the network (:func:`clearair.restorer.read_checkpoint`). Frozen parts
(the prior provider, the loss's perceiver and VGG16) are held in :class:`clearair.models.pretrained.Frozen`:
checkpoints hold only trainable weights, DDP neither broadcasts nor reduces them, ``module.to(device)`` moves them.

Perceive-IR's difficulty weights compare each negative's PSNR with the model's PSNR on a fixed probe set
(``probe_psnr``), re-measured at every epoch start (every ``fit.val_every`` steps in the pipeline). The negative's
PSNR is that of its training crop against the ground-truth crop (``negative_psnr="patch"``, as the authors) or the
whole image's stored in the tier shard (``"image"``, clearair 0.1.0). The probe is the set given to
:meth:`RestorerModule.set_probe` (:func:`clearair.data.probe_set`: a fixed number of crops per task, spread over
input difficulty; each rank measures its share and the sums are reduced), else the first validation batch (or,
when training starts before any validation, the first training batch) of each rank, as clearair 0.1.0 did.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from torch import Tensor, nn

from clearair.inference import pad_to_multiple, size_multiple
from clearair.metrics import psnr_torch
from clearair.models.factory import build_model, config_to_dict
from clearair.models.perceiver import TIERS, perceiver_loss
from clearair.models.pretrained import Frozen
from clearair.objectives import MAX_PSNR, apply_network, build_loss, check_loss, eval_mode
from clearair.optim import adamw_cosine
from clearair.priors import PriorProvider, build_priors, load_priors_from_batch, perceiver_from_config
from clearair.restorer import CHECKPOINT_INFO, frozen_record
from clearair.specs import OptimSpec, RestorerSpec

log = logging.getLogger(__name__)

VAL_AVERAGES = ("task_mean", "image_mean")  # what val/psnr averages (see RestorerModule's select_by)
PROBE_CHUNK = 8  # probe crops restored per forward pass
MAX_TASKS = 64  # validation sums are kept per task id in a fixed-size buffer (one all-reduce, any task mix per rank)


@contextmanager
def frozen_parts_in_eval() -> Iterator[None]:
    """Around ``trainer.fit``: Lightning warns about every module in eval mode at the start of training, and frozen
    parts (:class:`~clearair.models.pretrained.Frozen`) are in eval mode by design, so that warning is silenced
    here and nowhere else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)
        yield


class RestorerModule(L.LightningModule):
    """Trains a restorer network with a loss, validates it by PSNR per task, and keeps its weight average.

    Args:
        model: the network, ``model(lq, priors)`` (or ``model(lq)`` when there are no priors) -> restored
            ``(B, 3, H, W)``; a network of :func:`clearair.models.factory.build_model` is recorded in checkpoints
            (``arch``, ``config``), so :func:`clearair.load_restorer` loads it.
        loss: ``loss(model, batch, priors, probe_psnr) -> (loss, logged parts)`` (:mod:`clearair.objectives`);
            held frozen, with any parts it has.
        optim: the optimiser, its schedule and the weight average (:class:`clearair.specs.OptimSpec`).
        priors: the frozen prior provider (:mod:`clearair.priors`), for batches that carry no ``prior.*`` tensors.
        select_by: what ``val/psnr`` (the score checkpoints are kept by) averages: ``"task_mean"`` the mean of the
            per-task mean PSNRs, or ``"image_mean"`` the mean over images; both are logged, as ``val/psnr_tasks``
            and ``val/psnr_images``.
        probe_every_epoch: re-measure the probe PSNR at every epoch start (else once).
        spec: the plain record the parts were built from (:meth:`RestorerSpec.to_dict`), saved as the
            hyperparameters; :func:`build_restorer_module` passes it.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module,
        optim: OptimSpec,
        priors: nn.Module | None = None,
        *,
        select_by: str = "task_mean",
        probe_every_epoch: bool = True,
        spec: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if select_by not in VAL_AVERAGES:
            raise ValueError(f"unknown select_by {select_by!r}; valid: {', '.join(VAL_AVERAGES)}")
        if optim.ema_decay is not None and not 0.0 < optim.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {optim.ema_decay}")
        if spec is not None:
            self.save_hyperparameters(dict(spec))
        self.model, self.loss, self.optim = model, Frozen(loss), optim
        self.priors = Frozen(priors) if priors is not None else None
        self.select_by, self.probe_every_epoch = select_by, probe_every_epoch
        self.ema = copy.deepcopy(model).requires_grad_(False) if optim.ema_decay is not None else None
        persistent = optim.ema_decay is not None
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long), persistent=persistent)
        self.register_buffer("probe_psnr", torch.tensor(float("nan")))
        self._probe_value = float("nan")  # probe_psnr as a Python float: read every step without a device sync
        self._probe: dict[str, Tensor] | None = None
        self._probe_shared = False  # a probe set every rank holds whole (set_probe), not a rank's own batch
        self._val_total: Tensor | None = None
        self._frozen_sums: dict[str, str] | None = None

    def priors_for(self, batch: dict[str, Any]) -> dict[str, Tensor] | None:
        """Priors stored in the batch (``prior.*``), else computed by the provider from ``batch["lq"]``, else None."""
        stored = load_priors_from_batch(batch)
        if stored is not None or self.priors is None:
            return stored
        return self.priors(batch["lq"])

    # --- training ----------------------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        self._ensure_probe(batch)
        loss, parts = self.loss(self.model, batch, self.priors_for(batch), self._probe_value)
        n = len(batch["lq"])
        self.log_dict({f"train/{k}": v for k, v in parts.items() if k != "total"}, batch_size=n)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.optim
        opt, sched = adamw_cosine(self.model, o.lr, o.max_steps, o.min_lr, o.weight_decay, tuple(o.betas))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.update_ema()

    @torch.no_grad()
    def update_ema(self) -> None:
        """One step of the weight average towards the network's current weights (buffers copied as they are)."""
        n = int(self.ema_updates)
        decay = min(self.optim.ema_decay, (1 + n) / (10 + n))
        for average, current in zip(self.ema.parameters(), self.model.parameters(), strict=True):
            average.lerp_(current.detach(), 1.0 - decay)
        for average, current in zip(self.ema.buffers(), self.model.buffers(), strict=True):
            average.copy_(current)
        self.ema_updates += 1

    # --- probe -------------------------------------------------------------------------------------------------

    def set_probe(self, probe: dict[str, Any]) -> None:
        """Use ``probe`` (a batch of ``lq``, ``gt`` and any ``prior.*`` tensors, the same on every rank; see
        :func:`clearair.data.probe_set`) as the fixed probe set: each rank measures its share of it."""
        keep = ("lq", "gt", *[k for k in probe if k.startswith("prior.")])
        self._probe = {k: probe[k].detach().clone() for k in keep}
        self._probe_shared = True

    def _keep_probe(self, batch: dict[str, Any]) -> None:
        if self._probe is None:
            keep = ("lq", "gt", *[k for k in batch if k.startswith("prior.")])
            self._probe = {k: batch[k].detach().clone() for k in keep}

    def _ensure_probe(self, batch: dict[str, Any]) -> None:
        """Before the first step: fall back to this training batch as the probe when no validation ran."""
        if math.isnan(self._probe_value):
            self._keep_probe(batch)
            self.measure_probe()

    def _reduce_sum(self, x: Tensor) -> Tensor:
        return self._trainer.strategy.reduce(x, reduce_op="sum") if self._trainer is not None else x

    @torch.no_grad()
    def measure_probe(self) -> float:
        """The model's mean PSNR on the probe over all ranks; every rank must call it (a collective)."""
        rank, world = (self.global_rank, self.trainer.world_size) if self._trainer is not None else (0, 1)
        total = self._reduce_sum(self.probe_sums(rank, world))
        if total[1] > 0:  # else keep the last value (nan before any probe, the stored one after a resume)
            self._probe_value = float(total[0] / total[1])
            self.probe_psnr.fill_(self._probe_value)
        return self._probe_value

    @torch.no_grad()
    def probe_sums(self, rank: int = 0, world: int = 1) -> Tensor:
        """``(sum of PSNR, crops)`` over rank ``rank``'s part of the probe: every ``world``-th crop of a probe set
        (:meth:`set_probe`), or all of the rank's own validation batch; :data:`PROBE_CHUNK` crops per pass."""
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        if self._probe is None:
            return total
        share = slice(rank, None, world) if self._probe_shared else slice(None)
        mine = {k: v[share] for k, v in self._probe.items()}
        for start in range(0, len(mine["lq"]), PROBE_CHUNK):
            probe = {k: v[start : start + PROBE_CHUNK].to(self.device) for k, v in mine.items()}
            with eval_mode(self.exported):
                restored = self.restore(probe["lq"], self.priors_for(probe))
            psnr = psnr_torch(restored.float().clamp(0, 1), probe["gt"].float()).clamp(max=MAX_PSNR)
            total += torch.stack([psnr.sum(), psnr.new_tensor(float(len(psnr)))])
        return total

    def on_train_epoch_start(self) -> None:
        if self.probe_every_epoch or math.isnan(self._probe_value):
            if not math.isnan(self.measure_probe()):
                self.log("train/probe_psnr", self._probe_value, sync_dist=False)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Runs before the weights load: keep the stored probe PSNR (a resumed run keeps its difficulty weights)."""
        self._probe_value = float(checkpoint["state_dict"].get("probe_psnr", float("nan")))

    # --- validation --------------------------------------------------------------------------------------------

    def restore(self, lq: Tensor, priors: dict[str, Tensor] | None) -> Tensor:
        """Restore images of any size with the network that is exported (the weight average when there is one):
        reflect-pad to the model's size multiple, run, crop back."""
        h, w = lq.shape[-2:]
        net = self.exported
        return apply_network(net, pad_to_multiple(lq, size_multiple(net)), priors)[..., :h, :w]

    @property
    def exported(self) -> nn.Module:
        """The network that validation, the probe and the export use: the weight average when there is one."""
        return self.ema if self.ema is not None else self.model

    def on_validation_epoch_start(self) -> None:
        self._val_total = torch.zeros(MAX_TASKS, 2, dtype=torch.float64, device=self.device)  # per task: sum, n

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._keep_probe(batch)
        restored = self.restore(batch["lq"], self.priors_for(batch))
        psnr = psnr_torch(restored.float().clamp(0, 1), batch["gt"].float()).clamp(max=MAX_PSNR).double()
        task = batch["task"].to(self.device)
        if int(task.max()) >= MAX_TASKS:
            raise ValueError(f"validation task id {int(task.max())}: at most {MAX_TASKS} tasks are tracked")
        self._val_total.index_add_(0, task, torch.stack([psnr, torch.ones_like(psnr)], dim=1))

    def on_validation_epoch_end(self) -> None:
        total = self._reduce_sum(self._val_total)  # (MAX_TASKS, 2) over all ranks
        seen = total[:, 1] > 0
        if not seen.any():
            return
        by = {
            "image_mean": total[:, 0].sum() / total[:, 1].sum(),
            "task_mean": (total[seen, 0] / total[seen, 1]).mean(),
        }
        self.log("val/psnr_images", by["image_mean"].float(), sync_dist=True)
        self.log("val/psnr_tasks", by["task_mean"].float(), sync_dist=True)
        self.log("val/psnr", by[self.select_by].float(), prog_bar=True, sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the architecture and the frozen parts' sums beside the weights (plain types), so the network
        rebuilds without Lightning and a loader can tell whether it rebuilt the same frozen parts. A network that
        :func:`build_model` did not make has no record."""
        if not hasattr(self.model, "arch"):
            return
        if self._frozen_sums is None:  # the frozen parts never change: hash them once
            self._frozen_sums = frozen_record(self.priors.part if self.priors is not None else None)
        checkpoint[CHECKPOINT_INFO] = {
            "arch": self.model.arch,
            "config": config_to_dict(self.model.config),
            "frozen": self._frozen_sums,
        }


def check_prior_dims(model: nn.Module, provider: PriorProvider) -> None:
    """A ValueError when the network's config disagrees with the widths the prior provider gives."""
    cfg = getattr(model, "config", None)
    for name, value in provider.dims.items():
        if hasattr(cfg, name) and getattr(cfg, name) != value:
            raise ValueError(
                f"model config {name}={getattr(cfg, name)} but the prior provider gives {value}: "
                f"set model_config {name}: {value}"
            )


def build_restorer_module(spec: RestorerSpec) -> RestorerModule:
    """The training module ``spec`` describes: its settings checked, then the network built (from the caller's
    RNG), then the frozen parts (seeded or loaded), so one seed gives the same run anywhere."""
    check_loss(spec.loss)
    model = build_model(spec.network.arch, spec.network.config, spec.network.preset)
    provider = build_priors(spec.priors, spec.allow_random_frozen)
    if provider is not None:
        check_prior_dims(model, provider)
    loss = build_loss(spec.loss, spec.allow_random_frozen)
    return RestorerModule(
        model, loss, spec.optim, provider,
        select_by=spec.select_by, probe_every_epoch=spec.probe_every_epoch, spec=spec.to_dict(),
    )  # fmt: skip


def restorer_module_from_checkpoint(path: str | os.PathLike) -> RestorerModule:
    """The module a checkpoint of :class:`RestorerModule` was saved from (read with ``weights_only=True``; its
    spec in either layout, :meth:`RestorerSpec.from_dict`), with its weights, weight average and probe PSNR; the
    frozen parts rebuilt from their sources."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    module = build_restorer_module(RestorerSpec.from_dict(ckpt["hyper_parameters"]))
    module.on_load_checkpoint(ckpt)
    module.load_state_dict(ckpt["state_dict"])
    return module


class PerceiverModule(L.LightningModule):
    """Three-tier prompt learning (Perceive-IR stage 1): only the perceiver's prompt contexts train.

    Batches are ``(images (N, 3, S, S), tier labels (N,))`` as :func:`clearair.data.tier_loader` makes them.
    Validation logs ``val/accuracy`` (and per tier) and keeps the summed 3x3 confusion matrix (rows: true tier,
    columns: predicted) in ``self.confusion``. The frozen CLIP (:class:`clearair.models.pretrained.Frozen` inside
    the perceiver) is left out of checkpoints and rebuilt from ``perceiver_config`` (random-init CLIPs under the
    fixed ``seed``).
    """

    def __init__(
        self,
        perceiver_config: dict[str, Any],
        *,
        max_steps: int,
        lr: float = 4e-5,
        min_lr: float = 1e-6,
        weight_decay: float = 0.0,
        allow_random_frozen: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.perceiver = perceiver_from_config(perceiver_config, allow_random_frozen, seed)
        self.register_buffer("confusion", torch.zeros(len(TIERS), len(TIERS), dtype=torch.long), persistent=False)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        loss = perceiver_loss(self.perceiver(images), labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        return loss

    def on_validation_epoch_start(self) -> None:
        self.confusion.zero_()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        predicted = self.perceiver(images).argmax(dim=-1)
        n = len(TIERS)
        self.confusion += torch.bincount(labels * n + predicted, minlength=n * n).view(n, n)

    def on_validation_epoch_end(self) -> None:
        confusion = self._trainer.strategy.reduce(self.confusion, reduce_op="sum") if self._trainer else self.confusion
        self.confusion.copy_(confusion)
        if confusion.sum() == 0:
            return
        metrics = {"val/accuracy": confusion.diag().sum() / confusion.sum()}
        for i, tier in enumerate(TIERS):
            metrics[f"val/accuracy_{tier}"] = confusion[i, i] / confusion[i].sum().clamp(min=1)
        self.log_dict({k: v.float() for k, v in metrics.items()}, sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        opt, sched = adamw_cosine(self.perceiver, hp.lr, hp.max_steps, hp.min_lr, hp.weight_decay)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def export_prompts(self, path: str | Path, view: dict[str, Any] | None = None) -> Path:
        """The learned prompts as safetensors (:meth:`QualityPerceiver.save_prompts`), for the frozen perceiver."""
        return self.perceiver.save_prompts(path, view)
