"""Lightning modules: restorer training (plain L1, Perceive-IR, ClearAIR) and the perceiver's prompt learning.

Frozen parts (the prior provider, the perceiver behind the CLIP-aware loss, VGG16) are built in ``__init__`` from
plain config but kept out of the module tree: checkpoints hold only trainable weights and plain
hyperparameters (``torch.load(path, weights_only=True)`` reads them), the parts are rebuilt from their sources
when a checkpoint is loaded, and DDP neither broadcasts nor reduces them. ``_apply`` forwards device and dtype
moves to them, so ``module.to(device)`` still moves everything.

Perceive-IR's difficulty weights compare each negative's PSNR with the model's PSNR on a fixed probe set
(``probe_psnr``), re-measured at every epoch start (every ``fit.val_every`` steps in the pipeline). The negative's
PSNR is that of its training crop against the ground-truth crop (``negative_psnr="patch"``, as the authors) or the
whole image's stored in the tier shard (``"image"``, clearair 0.1.0). The probe is the set given to
:meth:`RestorerModule.set_probe` (:func:`clearair.data.probe_set`: a fixed number of crops per task, spread over
input difficulty; each rank measures its share and the sums are reduced), else the first validation batch (or,
when training starts before any validation, the first training batch) of each rank, as clearair 0.1.0 did.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from torch import Tensor, nn

from clearair import losses as clearair_losses
from clearair.inference import pad_to_multiple, size_multiple
from clearair.losses import (
    ClipAwareLoss,
    DifficultyAdaptivePerceptualLoss,
    PerceiveIRLoss,
    clue_reuse_loss,
    difficulty_weights,
)
from clearair.metrics import psnr_torch
from clearair.models.factory import build_model, config_to_dict
from clearair.models.perceiver import TIERS, perceiver_loss
from clearair.optim import adamw_cosine
from clearair.priors import (
    PriorProvider,
    build_frozen_perceiver,
    build_priors,
    build_vgg_features,
    load_priors_from_batch,
    perceiver_from_config,
)
from clearair.restorer import CHECKPOINT_INFO, frozen_record

log = logging.getLogger(__name__)

LOSSES = ("l1", "perceive_ir", "clearair")
MAX_PSNR = 100.0  # identical images have infinite PSNR; means are taken over values capped here
CON_LABELS = ("family", "task")  # the batch member the InfoNCE labels come from (see RestorerModule's con_labels)
VAL_AVERAGES = ("task_mean", "image_mean")  # what val/psnr averages (see RestorerModule's select_by)
NEGATIVE_PSNR = ("patch", "image")  # where a negative's PSNR comes from (see RestorerModule's negative_psnr)
PROBE_CHUNK = 8  # probe crops restored per forward pass
MAX_TASKS = 64  # validation sums are kept per task id in a fixed-size buffer (one all-reduce, any task mix per rank)


def build_perceive_ir_loss(
    weights: dict[str, float] | None,
    perceiver: dict[str, Any] | None,
    vgg: str | dict[str, Any] | None,
    allow_random: bool = False,
    pixel: str = "l1",
    clip_temperature: float | None = 1.0,
    gather: bool = False,
    vgg_taps: tuple[str, ...] | None = None,
    vgg_layer_weights: tuple[float, ...] | None = None,
) -> PerceiveIRLoss:
    """Perceive-IR's loss with its frozen parts; a part whose weight is 0 is not built. ``vgg_taps`` and
    ``vgg_layer_weights``: the perceptual loss's VGG16 layers and their weights (None: the authors')."""
    w = clearair_losses.loss_weights("perceive_ir", weights)
    if w.clip and perceiver is None:
        raise ValueError("the CLIP-aware loss needs perceiver={'config': ..., 'prompts': ...} (or loss_weights clip=0)")
    clip = ClipAwareLoss(build_frozen_perceiver(perceiver, allow_random), clip_temperature) if w.clip else None
    dpl = None
    if w.dpl:
        layer_weights = tuple(vgg_layer_weights or clearair_losses.DPL_LAYER_WEIGHTS)
        dpl = DifficultyAdaptivePerceptualLoss(build_vgg_features(vgg, allow_random, vgg_taps), layer_weights)
    return PerceiveIRLoss(w, clip, dpl, pixel=pixel, gather=gather)


def _dihedral(x: Tensor, k: int, flip: bool) -> Tensor:
    return torch.rot90(x.flip(-1) if flip else x, k, dims=(-2, -1))


class AlignedRestore:
    """``restore(view)`` for :func:`clue_reuse_loss` that moves spatial priors (``(B, M, h, w)`` region masks)
    along with the dihedral view of ``reference`` it is given.

    The first call receives an exact dihedral transform of ``reference`` (the weak view): the transform is found
    by comparison and reused for the later (photometrically changed) views.
    """

    def __init__(self, model: nn.Module, priors: dict[str, Tensor] | None, reference: Tensor) -> None:
        self.model, self.priors, self.reference = model, priors, reference
        self.transform = None

    def _find(self, view: Tensor) -> functools.partial:
        for flip in (False, True):
            for k in range(4):
                candidate = _dihedral(self.reference, k, flip)
                if candidate.shape == view.shape and torch.equal(candidate, view):
                    return functools.partial(_dihedral, k=k, flip=flip)
        raise RuntimeError("clue reuse: the first view is not a dihedral transform of the restored image")

    def __call__(self, view: Tensor) -> Tensor:
        if self.transform is None:
            self.transform = self._find(view)
        priors = self.priors and {k: self.transform(v) if v.ndim == 4 else v for k, v in self.priors.items()}
        return self.model(view, priors)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Temporarily in eval mode (ClearAIR: no mask dropout), gradients untouched."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class RestorerModule(L.LightningModule):
    """Trains a restorer from :func:`clearair.models.factory.build_model` with one of :data:`LOSSES`.

    Args:
        arch, model_config, preset: the network (see ``build_model``).
        loss: ``"l1"``; ``"perceive_ir"`` (L1 + InfoNCE on CFE + CLIP-aware + difficulty-adaptive perceptual);
            ``"clearair"`` (L1 + clue reuse; its two extra passes run without mask dropout, so the weak and the
            strong view see the same region masks).
        loss_weights: fields of :class:`LossWeights` or :class:`ClearAIRLossWeights` (empty for ``"l1"``).
        priors: a prior-provider spec (:func:`clearair.priors.build_priors`); batches that carry ``prior.*``
            tensors use those instead.
        perceiver: ``{"config", "prompts"}`` of the frozen stage-1 perceiver, for the CLIP-aware loss.
        vgg: VGG16 source for the perceptual loss (:func:`clearair.priors.build_vgg_features`).
        allow_random_frozen: allow randomly initialised frozen parts (tiny test configs only).
        max_steps: length of the cosine schedule from ``lr`` to ``min_lr`` (stepped every optimizer step).
        probe_every_epoch: re-measure the probe PSNR at every epoch start (else once).
        pixel_loss: the pixel term (:data:`clearair.losses.PIXEL_LOSSES`): ``"l1"`` as the papers, or ``"mse"``.
        clip_temperature: the CLIP-aware loss's softmax temperature (:class:`clearair.losses.ClipAwareLoss`):
            1 (raw cosines, as the authors' code) or None (the CLIP's learned one).
        select_by: what ``val/psnr`` (the score checkpoints are kept by) averages: ``"task_mean"`` the mean of the
            per-task mean PSNRs, as the Perceive-IR authors pick their checkpoint, or ``"image_mean"`` the mean over
            images (clearair 0.1.0; a 3-task validation split is ~80% haze, so this picks the best dehazer).
            Both are logged, as ``val/psnr_tasks`` and ``val/psnr_images``.
        con_labels: the InfoNCE labels: ``"family"`` (degradation types; the noise levels one label, as the
            authors) or ``"task"`` (every task its own label; clearair 0.1.0, where noise levels repel).
        con_gather: InfoNCE negatives from every data-parallel rank (the authors' all_gather), not only this
            rank's batch; ``train/con_coverage`` logs the fraction of anchors with at least one negative.
        vgg_taps, vgg_layer_weights: the perceptual loss's VGG16 layers and weights (None: the authors' taps
            :data:`clearair.losses.PERCEIVE_IR_TAPS` and weights :data:`clearair.losses.DPL_LAYER_WEIGHTS`).
        negative_psnr: each medium negative's PSNR for its difficulty weight: ``"patch"`` of its training crop
            (as the authors), or ``"image"`` the whole image's, stored in the tier shard (clearair 0.1.0).
        ema_decay: keep an exponential moving average of the network's weights (``self.ema``), updated after every
            optimizer step with decay ``min(ema_decay, (1 + n) / (10 + n))`` at update ``n`` (so early, untrained
            weights fade fast in short runs); :meth:`restore` (validation, the probe) and the exported network use
            it. None: no average (clearair 0.1.0).
    """

    def __init__(
        self,
        arch: str,
        model_config: dict[str, Any] | None = None,
        preset: str = "paper",
        loss: str = "l1",
        loss_weights: dict[str, float] | None = None,
        priors: dict[str, Any] | None = None,
        perceiver: dict[str, Any] | None = None,
        vgg: str | dict[str, Any] | None = None,
        *,
        max_steps: int,
        allow_random_frozen: bool = False,
        lr: float = 2e-4,
        min_lr: float = 1e-6,
        weight_decay: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        probe_every_epoch: bool = True,
        pixel_loss: str = "l1",
        clip_temperature: float | None = 1.0,
        select_by: str = "task_mean",
        con_labels: str = "family",
        con_gather: bool = True,
        vgg_taps: tuple[str, ...] | None = None,
        vgg_layer_weights: tuple[float, ...] | None = None,
        negative_psnr: str = "patch",
        ema_decay: float | None = None,
    ) -> None:
        super().__init__()
        if negative_psnr not in NEGATIVE_PSNR:
            raise ValueError(f"unknown negative_psnr {negative_psnr!r}; valid: {', '.join(NEGATIVE_PSNR)}")
        if con_labels not in CON_LABELS:
            raise ValueError(f"unknown con_labels {con_labels!r}; valid: {', '.join(CON_LABELS)}")
        if select_by not in VAL_AVERAGES:
            raise ValueError(f"unknown select_by {select_by!r}; valid: {', '.join(VAL_AVERAGES)}")
        self.pixel = clearair_losses.pixel_loss(pixel_loss)
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}")
        self.save_hyperparameters()
        self.model = build_model(arch, model_config, preset)
        self._frozen: dict[str, nn.Module] = {}  # kept out of the module tree (see the module docstring)
        provider = build_priors(priors, allow_random_frozen)
        if provider is not None:
            self._frozen["priors"] = provider
            self._check_prior_dims(provider)
        weights = clearair_losses.loss_weights(loss, loss_weights)  # checked for every loss: l1 takes none
        self.clearair_weights = weights if loss == "clearair" else None
        if loss == "perceive_ir":
            self._frozen["loss"] = build_perceive_ir_loss(
                loss_weights, perceiver, vgg, allow_random_frozen, pixel_loss, clip_temperature, con_gather,
                vgg_taps, vgg_layer_weights,
            )  # fmt: skip
        self.ema = copy.deepcopy(self.model).requires_grad_(False) if ema_decay is not None else None
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}")
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long), persistent=ema_decay is not None)
        self.register_buffer("probe_psnr", torch.tensor(float("nan")))
        self._probe_value = float("nan")  # probe_psnr as a Python float: read every step without a device sync
        self._probe: dict[str, Tensor] | None = None
        self._probe_shared = False  # a probe set every rank holds whole (set_probe), not a rank's own batch
        self._val_total: Tensor | None = None
        self._frozen_sums: dict[str, str] | None = None

    # --- frozen parts ------------------------------------------------------------------------------------------

    @property
    def prior_provider(self) -> PriorProvider | None:
        return self._frozen.get("priors")

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        for part in getattr(self, "_frozen", {}).values():
            part._apply(fn, recurse)
        return self

    def _check_prior_dims(self, provider: PriorProvider) -> None:
        cfg = self.model.config
        for name, value in provider.dims.items():
            if hasattr(cfg, name) and getattr(cfg, name) != value:
                raise ValueError(
                    f"model config {name}={getattr(cfg, name)} but the prior provider gives {value}: "
                    f"set model_config {name}: {value}"
                )

    def priors_for(self, batch: dict[str, Any]) -> dict[str, Tensor] | None:
        """Priors stored in the batch (``prior.*``), else computed by the provider from ``batch["lq"]``, else None."""
        stored = load_priors_from_batch(batch)
        if stored is not None or self.prior_provider is None:
            return stored
        return self.prior_provider(batch["lq"])

    # --- training ----------------------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        self._ensure_probe(batch)
        loss, parts = getattr(self, f"_{self.hparams.loss}_loss")(batch)
        n = len(batch["lq"])
        self.log_dict({f"train/{k}": v for k, v in parts.items() if k != "total"}, batch_size=n)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        return loss

    def _l1_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        restored = self.model(batch["lq"], self.priors_for(batch))
        return self.pixel(restored, batch["gt"]), {}

    def _perceive_ir_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        lq, priors = batch["lq"], self.priors_for(batch)
        restored, cfe = self._forward_features(lq, priors)
        cfe2 = self.model.cfe(batch["lq2"]) if cfe is not None and "lq2" in batch else None
        negatives, weights = self.negatives(batch)
        labels = batch[self.hparams.con_labels]  # "family" (the noise levels one label) or "task"
        return self._frozen["loss"](restored, batch["gt"], lq, cfe, cfe2, labels, negatives, weights)

    def _clearair_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        w, priors = self.clearair_weights, self.priors_for(batch)
        restored = self.model(batch["lq"], priors)
        l1 = self.pixel(restored, batch["gt"])
        with eval_mode(self.model):  # both views see the same (all) region masks
            inter = clue_reuse_loss(AlignedRestore(self.model, priors, restored.detach()), restored, w.gamma)
        return w.l1 * l1 + w.inter * inter, {"l1": float(l1.detach()), "inter": float(inter.detach())}

    def _forward_features(self, lq: Tensor, priors: dict[str, Tensor] | None) -> tuple[Tensor, Tensor | None]:
        if hasattr(self.model, "forward_features"):
            return self.model.forward_features(lq, priors)
        return self.model(lq, priors), None

    def negatives(self, batch: dict[str, Any]) -> tuple[Tensor | None, Tensor | None]:
        """Medium-tier negatives ``(B, P, 3, c, c)`` and their difficulty weights ``(B, P)``, or ``(None, None)``."""
        if "medium" not in batch:
            return None, None
        return batch["medium"], difficulty_weights(self.negative_psnr(batch), self._probe_value)

    @torch.no_grad()
    def negative_psnr(self, batch: dict[str, Any]) -> Tensor:
        """Each negative's PSNR ``(B, P)``: of its crop against the ground-truth crop, or the stored image value."""
        if self.hparams.negative_psnr == "image":
            return batch["medium_psnr"]
        medium, gt = batch["medium"], batch["gt"]  # (B, P, 3, c, c), (B, 3, c, c)
        target = gt.unsqueeze(1).expand_as(medium).flatten(0, 1)
        psnr = psnr_torch(medium.flatten(0, 1).float(), target.float()).clamp(max=MAX_PSNR)
        return psnr.view(medium.shape[:2]).float()

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        opt, sched = adamw_cosine(self.model, hp.lr, hp.max_steps, hp.min_lr, hp.weight_decay, tuple(hp.betas))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.update_ema()

    @torch.no_grad()
    def update_ema(self) -> None:
        """One step of the weight average towards the network's current weights (buffers copied as they are)."""
        n = int(self.ema_updates)
        decay = min(self.hparams.ema_decay, (1 + n) / (10 + n))
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
        if self.hparams.probe_every_epoch or math.isnan(self._probe_value):
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
        return net(pad_to_multiple(lq, size_multiple(net)), priors)[..., :h, :w]

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
        self.log("val/psnr", by[self.hparams.select_by].float(), prog_bar=True, sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the architecture and the frozen parts' sums beside the weights (plain types), so the network
        rebuilds without Lightning and a loader can tell whether it rebuilt the same frozen parts."""
        if self._frozen_sums is None:  # the frozen parts never change: hash them once
            self._frozen_sums = frozen_record(self.prior_provider)
        checkpoint[CHECKPOINT_INFO] = {
            "arch": self.model.arch,
            "config": config_to_dict(self.model.config),
            "frozen": self._frozen_sums,
        }


class PerceiverModule(L.LightningModule):
    """Three-tier prompt learning (Perceive-IR stage 1): only the perceiver's prompt contexts train.

    Batches are ``(images (N, 3, S, S), tier labels (N,))`` as :func:`clearair.data.tier_loader` makes them.
    Validation logs ``val/accuracy`` (and per tier) and keeps the summed 3x3 confusion matrix (rows: true tier,
    columns: predicted) in ``self.confusion``. The frozen CLIP is left out of checkpoints and rebuilt from
    ``perceiver_config`` (random-init CLIPs under the fixed ``seed``).
    """

    FROZEN_PREFIX = "perceiver.clip."

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

    def state_dict(self, *args, **kwargs) -> dict[str, Tensor]:
        state = super().state_dict(*args, **kwargs)
        frozen = kwargs.get("prefix", "") + self.FROZEN_PREFIX
        for key in [k for k in state if k.startswith(frozen)]:
            del state[key]
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Accept checkpoints without the frozen CLIP: its current weights fill in."""
        current = nn.Module.state_dict(self)
        frozen = {k: v for k, v in current.items() if k.startswith(self.FROZEN_PREFIX) and k not in state_dict}
        return super().load_state_dict({**frozen, **state_dict}, strict=strict, assign=assign)

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
