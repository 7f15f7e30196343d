"""The LightningModule: training, validation and test logic around encoder + CaptioningRNN."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor, nn

from .chair import CocoChair
from .checkpointing import check_format, read_checkpoint, stamp
from .data.vocab import Vocabulary
from .grounding import GroundingScorer
from .metrics import CaptionScorer, DecodedCaptions, GroundedScorer, StageResult
from .models import CaptioningRNN
from .models.decoding import CaptionDecoder, Decoded, Ensemble
from .objectives import Objective
from .runtime import ImageContract
from .schedules import fill_run_arguments

__all__ = ["CaptioningModule", "NonFiniteLossError", "load_checkpoint", "load_ensemble"]

NONFINITE_POLICIES = ("fail", "skip")
DEFAULT_OBJECTIVE = {"_target_": "captioning.objectives.CrossEntropy"}


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite (``module.nonfinite_loss=fail``)."""


def _plain(value: Any) -> Any:
    """Hydra nodes -> plain dicts and lists, so hyperparameters load with ``torch.load(weights_only=True)``."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def settle_encoder(encoder: Mapping[str, Any], decoder: Mapping[str, Any]) -> dict[str, Any]:
    """The encoder config with ``pathways: auto`` settled by the decoder it feeds (the checkpoint records the
    outcome). Separate shape and colour pathways help the attention decoder, which reads both from the same cell
    of the map, name pairs it never saw; a decoder that max-pools the map into one vector (rnn, lstm) then only
    learns *that* some cell is red and *that* some cell holds a star: on the built-in set the LSTM's object
    precision is 0.76 with them and 0.90 without (colours 0.78 and 0.97); flattening the map instead: 0.88."""
    encoder = dict(encoder)
    if encoder.get("pathways") == "auto":
        encoder["pathways"] = (decoder or {}).get("cell_type", "lstm") == "attention"
    return encoder


class CaptioningModule(L.LightningModule):
    """Encoder + recurrent decoder, trained with the masked temporal softmax loss.

    Every argument is a plain value (the Hydra node of its config group), so the checkpoint alone rebuilds
    the model: ``CaptioningModule.load_from_checkpoint(path)``.

    Args:
        encoder: ``_target_`` config of the image encoder (``conf/encoder``), mapping images (N, 3, S, S)
            to a feature map (N, D, h, w).
        decoder: ``_target_`` config of ``CaptioningRNN`` (``conf/model``) without ``vocab_size`` and
            ``input_dim``, which come from the data and the encoder.
        optimizer: partial ``torch.optim`` config (``_partial_: true``), called with the parameter groups.
        scheduler: partial LR-scheduler config, or None.
        scheduler_interval: ``"epoch"`` or ``"step"``: when the scheduler steps.
        scheduler_monitor: the metric a ``ReduceLROnPlateau`` scheduler watches.
        encoder_lr: learning rate of a trainable pretrained encoder (None: the optimizer's).
        decoding: ``_target_`` config of the ``CaptionDecoder`` used in validation and test.
        vocab: the vocabulary as its list of words (index = id); filled in from the datamodule at fit time
            and stored in the checkpoint so that captions can be decoded from the checkpoint alone.
        objective: ``_target_`` config of the training objective (``conf/objective``): the cross-entropy of
            the courses (the default) or self-critical sequence training (:mod:`captioning.objectives`).
        nonfinite_loss: what a NaN or infinite training loss does: ``"fail"`` stops the run with
            :class:`NonFiniteLossError` naming the step (before the update: the weights stay finite);
            ``"skip"`` skips the step (no update), warns, and counts it in ``train/nonfinite_steps``.
            Under DDP a non-finite loss on any rank makes every rank fail, or skip, at the same step.
    """

    def __init__(
        self,
        encoder: Mapping[str, Any],
        decoder: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any] | None = None,
        scheduler_interval: str = "step",
        scheduler_monitor: str = "val/loss",
        encoder_lr: float | None = None,
        decoding: Mapping[str, Any] | None = None,
        vocab: Sequence[str] | None = None,
        nonfinite_loss: str = "fail",
        objective: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if nonfinite_loss not in NONFINITE_POLICIES:
            raise ValueError(
                f"module.nonfinite_loss={nonfinite_loss!r} is not one of {', '.join(NONFINITE_POLICIES)}."
            )
        self.save_hyperparameters(
            {
                "encoder": _plain(encoder),
                "decoder": _plain(decoder),
                "optimizer": _plain(optimizer),
                "scheduler": _plain(scheduler),
                "scheduler_interval": scheduler_interval,
                "scheduler_monitor": scheduler_monitor,
                "encoder_lr": encoder_lr,
                "decoding": _plain(decoding) or {},
                "vocab": list(vocab) if vocab is not None else None,
                "nonfinite_loss": nonfinite_loss,
                "objective": _plain(objective) or dict(DEFAULT_OBJECTIVE),
            }
        )
        self.nonfinite_steps = 0
        self._image_contract: ImageContract | None = None  # the checkpoint's (on_load_checkpoint)
        self._drop_gradients = False  # set by a skipped step, read by on_before_optimizer_step
        self.hparams.encoder = settle_encoder(self.hparams.encoder, self.hparams.decoder)
        self.encoder: nn.Module = instantiate(self.hparams.encoder)
        self.decoder: CaptioningRNN | None = None
        self.vocab: Vocabulary | None = None
        # other trained captioners this one decodes with as an ensemble (set_ensemble): their encoder and decoder
        self.members = nn.ModuleList()
        self._members_without_images: list[bool] = []
        self.set_decoding(instantiate(self.hparams.decoding) if self.hparams.decoding else CaptionDecoder())
        self.objective: Objective = instantiate(self.hparams.get("objective") or DEFAULT_OBJECTIVE)
        # per split: its scorers (BLEU/CIDEr-D, and the grounded metric where the data knows what each image
        # shows) and the last pass's captions and numbers
        self.results: dict[str, StageResult] = {}
        if vocab is not None:
            self._build_decoder(list(vocab))

    # ---------------------------------------------------------------------------------------------
    # Building
    def _build_decoder(self, words: list[str]) -> None:
        self.vocab = Vocabulary(words)  # checks the special tokens
        self.hparams.vocab = list(words)
        self.decoder = instantiate(
            self.hparams.decoder, vocab_size=len(self.vocab), input_dim=self.encoder.out_dim,
            null_id=self.vocab.null_id, start_id=self.vocab.start_id, end_id=self.vocab.end_id,
        )
        if self.decoding.bad_endings:  # its words become ids of this vocabulary
            self.decoding = self._requested_decoding.for_model(self.trained_without_images, self.vocab)

    @property
    def trained_without_images(self) -> bool:
        """Whether training dropped the image now and then (``objective.image_dropout``), which teaches the model
        the captions' prior that classifier-free guidance subtracts."""
        objective = self.hparams.get("objective") or {}
        return float(objective.get("image_dropout") or 0.0) > 0

    def set_decoding(self, decoding: CaptionDecoder) -> None:
        """Use another decoding strategy (eval.py and caption.py override the checkpoint's); ``guidance="auto"``
        becomes guidance for a model trained with image dropout, none for another."""
        self._requested_decoding = decoding
        self.decoding = decoding.for_model(self.trained_without_images, self.vocab)
        self.collectors = nn.ModuleDict(
            {stage: DecodedCaptions(max_length=decoding.max_length, n_best=decoding.n_best) for stage in ("val", "test")}
        )

    def set_ensemble(self, members: Sequence[CaptioningModule]) -> None:
        """Decode as an ensemble of this module and ``members`` (other trained modules of the same vocabulary,
        :func:`load_ensemble`): each step averages their log-probabilities (:class:`Ensemble`). The loss and
        everything else stay this module's. An empty list decodes alone again."""
        for member in members:
            if member.vocab is None or self.vocab is None or member.vocab != self.vocab:
                raise ValueError("set_ensemble: every member must have this module's vocabulary.")
        self.members = nn.ModuleList(nn.ModuleDict({"encoder": m.encoder, "decoder": m.decoder}) for m in members)
        self._members_without_images = [m.trained_without_images for m in members]

    def decode(self, features: Tensor, images: Tensor | None = None, image_ids: Tensor | None = None) -> Decoded:
        """Captions of a batch with the configured decoding: from this model's ``features`` (N, D, h, w), or, for an
        ensemble, from the ``images`` (N, 3, S, S) each member encodes itself. ``image_ids`` (N,) key seeded
        sampling, so an image's samples do not depend on its batch (or, under DDP, its process)."""
        if not len(self.members):
            return self.decoding(self.decoder, features, image_ids)
        if images is None:
            raise ValueError(
                "An ensemble decodes from images (each member reads them with its own encoder), but the batch holds "
                "cached features only: evaluate ensembles with data.feature_cache=false.")
        requested = self._requested_decoding.guidance
        guidance = [self.decoding.guidance or 0.0] + [
            (CaptionDecoder.AUTO_GUIDANCE if without else 0.0) if requested is None else requested
            for without in self._members_without_images]
        ensemble = Ensemble([self.encoder, *(m["encoder"] for m in self.members)],
                            [self.decoder, *(m["decoder"] for m in self.members)], guidance)
        return self.decoding(ensemble, images, image_ids)

    def configure_model(self) -> None:
        """Build the decoder, sized by the datamodule's vocabulary, unless the checkpoint's vocabulary built it.
        Lightning calls this before fitting; callbacks that copy the model (:class:`~captioning.callbacks.EMA`)
        call it first, so that their copy has a decoder. Idempotent."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if self.decoder is None:
            if datamodule is None:
                raise RuntimeError("CaptioningModule needs a datamodule with a vocabulary (or a checkpoint).")
            self._build_decoder(datamodule.vocab.idx_to_word)

    def setup(self, stage: str) -> None:
        """Size the decoder from the datamodule's vocabulary; get the references the metrics need."""
        self.configure_model()
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is None:
            return
        data_vocab = datamodule.vocab
        if data_vocab != self.vocab:
            raise ValueError(
                f"The model's vocabulary ({len(self.vocab)} words) differs from the data's "
                f"({len(data_vocab)} words, {datamodule.vocab_path}). A checkpoint only decodes with the "
                "vocabulary it was trained with: use the data set (and data.min_word_count / data.max_length) "
                "it was trained on."
            )
        if stage == "fit":
            self.objective.setup(datamodule, self.trainer)
        # the test split only when testing: COCO 2017 (and the official 2014 layout) has none to fit with
        for split, stages in (("val", ("fit", "validate")), ("test", ("test",))):
            if stage in stages and split not in self.results:
                self.results[split] = StageResult(split, CaptionScorer(datamodule.references(split)),
                                                  grounding_scorer(datamodule, split))

    def on_train_start(self) -> None:
        # after Lightning restored a resumed run's schedulers: they keep the length of the run that saved them
        run_steps = self.trainer.estimated_stepping_batches
        for config in self.trainer.lr_scheduler_configs:
            total = getattr(config.scheduler, "total_steps", None)
            if config.interval != "step" or not isinstance(total, int) or not total < run_steps < float("inf"):
                continue
            rate = ""
            if self.trainer.global_step >= total:
                rate = f" ({min(g['lr'] for g in config.scheduler.optimizer.param_groups):.2g})"
            if self.trainer.ckpt_path:
                why = ("A resumed run (ckpt_path=...) keeps the schedule of the run that saved it, sized by that run's "
                       "trainer.max_epochs (a one-cycle schedule ends near zero); to train longer, start a new run "
                       "with the longer trainer.max_epochs.")
            else:
                why = ("scheduler.total_steps is shorter than the run: leave it out to size the schedule by the run "
                       "(trainer.max_epochs / max_steps).")
            rank_zero_warn(
                f"The learning-rate schedule {type(config.scheduler).__name__} ends at optimizer step {total}, but "
                f"this run goes on to step {run_steps} (trainer.max_epochs={self.trainer.max_epochs}): the last "
                f"{run_steps - total} steps train at its final rate{rate}. {why}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stamp(checkpoint)
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is not None:
            # which DataModule the saved datamodule_hyper_parameters belong to: eval.py and caption.py rebuild
            # the data from the checkpoint alone (data=coco runs need no data=coco to be evaluated)
            checkpoint["datamodule_target"] = f"{type(datamodule).__module__}.{type(datamodule).__qualname__}"
        contract = self.image_contract
        if contract is not None:
            checkpoint["image_contract"] = contract.as_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_format(checkpoint)
        self._check_fits(checkpoint)
        if checkpoint.get("image_contract"):
            self._image_contract = ImageContract.from_dict(checkpoint["image_contract"])

    @property
    def image_contract(self) -> ImageContract | None:
        """How images reach the model: the encoder's declared input at the size the data resized to — the
        checkpoint's once loaded (caption.py, the demo and the export read it); None when neither is known."""
        if self._image_contract is not None:
            return self._image_contract
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        return datamodule.image_contract() if hasattr(datamodule, "image_contract") else None

    def start_from(self, path: str | Path) -> None:
        """Take the weights (and vocabulary) of another run's checkpoint, nothing else: the optimizer, the
        schedule, the epochs and the objective are this run's. How ``ckpt_path=<xe.ckpt> objective=scst``
        fine-tunes a cross-entropy model (:func:`captioning.utils.resolve_start`)."""
        checkpoint = read_checkpoint(Path(path))
        vocab = checkpoint["hyper_parameters"].get("vocab")
        if self.decoder is None and vocab:
            self._build_decoder(list(vocab))
        self._check_fits(checkpoint)
        self.load_state_dict(checkpoint["state_dict"])

    def _check_fits(self, checkpoint: dict[str, Any]) -> None:
        saved_hparams = checkpoint["hyper_parameters"]
        saved = saved_hparams.get("vocab")
        if saved is not None and self.vocab is not None and saved != self.vocab.idx_to_word:
            raise ValueError(
                f"The checkpoint's vocabulary ({len(saved)} words) differs from the data's ({len(self.vocab)} "
                "words): resume or evaluate it on the data set (and data.min_word_count / data.max_length) it "
                "was trained on."
            )
        if self.decoder is None:
            return
        # Whether the weights fit is the weights' business (dropout, freezing, the loss may change between
        # runs); when they do not, the config keys that differ say why.
        own, weights = self.state_dict(), checkpoint["state_dict"]
        unfit = sorted(set(own) ^ set(weights)) + sorted(
            k for k in set(own) & set(weights) if tuple(own[k].shape) != tuple(weights[k].shape))
        if unfit:
            differences = [
                f"{group}.{key} (checkpoint: {before.get(key)!r}, config: {now.get(key)!r})"
                for part, group in (("decoder", "model"), ("encoder", "encoder"))
                for before, now in [(saved_hparams.get(part) or {}, self.hparams[part] or {})]
                for key in sorted(set(before) | set(now)) if before.get(key) != now.get(key)
            ]
            raise ValueError(
                f"The checkpoint's weights do not fit the configured model ({len(unfit)} tensors differ, e.g. "
                f"{', '.join(unfit[:3])}); the model configs differ in {'; '.join(differences) or 'nothing'}. Its "
                "weights only fit the model it was trained as: run with the same model/encoder options (the "
                "checkpoint's run dir has them in config.yaml), or evaluate it with src/eval.py, which rebuilds "
                "the model from the checkpoint alone."
            )

    # ---------------------------------------------------------------------------------------------
    # Steps
    def encode(self, batch: Mapping[str, Any]) -> Tensor:
        """Features (N, D, h, w): from the feature cache when the batch has them, else from the images; one row
        per caption (an image with several captions in the batch is encoded once, its row repeated)."""
        features = batch["features"] if "features" in batch else self.encoder(batch["images"])
        if "image_index" in batch:
            features = features.index_select(0, batch["image_index"])
        return features

    def forward(self, images: Tensor) -> Decoded:
        """Images (N, 3, S, S) -> decoded captions with the configured strategy (and ensemble)."""
        return self.decode(None if len(self.members) else self.encoder(images), images)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        # The forward updates BatchNorm running statistics before the loss can be checked; keep a copy (a few
        # values per channel) so a non-finite batch leaves no NaN in them either.
        running_stats = _running_stats(self)
        saved_stats = [stat.clone() for stat in running_stats]
        loss, logs = self.objective(self.decoder, self.encode(batch), batch)
        # One device sync a step; training on a NaN would silently destroy the weights.
        if not self._finite_on_every_rank(loss):
            for stat, saved in zip(running_stats, saved_stats, strict=True):
                stat.copy_(saved)
            return self._nonfinite(loss, batch_idx)
        size = len(batch["captions"])
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        for name, value in logs.items():
            # the mean over the processes under DDP (every process has a batch of the same size)
            self.log(f"train/{name}", value, on_step=True, on_epoch=False, sync_dist=True, batch_size=size,
                     prog_bar=name == "scst/reward")
        return loss

    def _finite_on_every_rank(self, loss: Tensor) -> bool:
        # Under DDP all ranks must take the same branch: a rank that skips its backward (or raises) while the
        # others wait in the gradient all-reduce would hang the run. One tiny all-reduce a step.
        finite = bool(torch.isfinite(loss))
        trainer = self._trainer
        return trainer.strategy.reduce_boolean_decision(finite, all=True) if trainer is not None else finite

    def _nonfinite(self, loss: Tensor, batch_idx: int) -> Tensor:
        where = f"global step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx})"
        if self._trainer is not None and self.trainer.world_size > 1:
            # Every rank is here (the decision was collective): name the process whose loss is not finite.
            losses = self.all_gather(loss.detach().float()).reshape(-1)
            rank = int((~torch.isfinite(losses)).nonzero()[0])
            loss = losses[rank]
            where += f" on process {rank} of {self.trainer.world_size}"
        if self.hparams.get("nonfinite_loss", "fail") == "skip":
            self.nonfinite_steps += 1
            self.log("train/nonfinite_steps", float(self.nonfinite_steps), on_step=True, on_epoch=False,
                     batch_size=1)
            rank_zero_warn(f"Non-finite training loss ({loss.item()}) at {where}: step skipped "
                           f"({self.nonfinite_steps} so far; module.nonfinite_loss=skip).")
            # Not `return None`: Lightning refuses it under DDP, where every rank must join the gradient
            # all-reduce. A zero loss on the (finite) weights alone gives exact zero gradients, free of the
            # NaNs; on_before_optimizer_step then drops them, so the optimizer leaves every weight and its
            # state (Adam's moments, weight decay) untouched.
            self._drop_gradients = True
            return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
        raise NonFiniteLossError(
            f"The training loss is {loss.item()} at {where}; the run stopped before this step's update, so the "
            "weights are still finite. Try a lower learning rate (optimizer.lr), stronger gradient clipping "
            "(trainer.gradient_clip_val=1.0), full precision (trainer.precision=32-true) if you train in 16-bit, "
            "or skip such steps with module.nonfinite_loss=skip."
        )

    def _eval_step(self, batch: Mapping[str, Any], stage: str) -> None:
        features = self.encode(batch)
        loss = self.decoder(features, batch["captions"])
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["captions"]))
        decoded = self.decode(features, batch.get("images"), batch["image_ids"])
        self.collectors[stage].update(batch["image_ids"], decoded.captions, decoded.nbest)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_epoch_end(self, stage: str) -> None:
        # DecodedCaptions gathers every rank's captions and drops the DistributedSampler's repeats, so all
        # ranks score exactly the split, once per image: the same numbers as one process.
        collector = self.collectors[stage]
        decoded = collector.compute()
        nbest = collector.last_nbest
        collector.reset()
        predictions = {image_id: self.caption_text(ids) for image_id, ids in decoded.items()}
        result = self.results[stage]
        result.predictions = predictions
        result.nbest = {image_id: [(self.caption_text(ids), lp) for ids, lp in entries]
                        for image_id, entries in nbest.items()}
        if not predictions or self.trainer.sanity_checking:
            return
        # kept as computed (float64): eval.py reports these, so the captions are scored once
        result.score(predictions)
        for name, value in result.logged.items():
            # Equal on every rank already (computed from the gathered captions): syncing averages equal numbers.
            self.log(f"{stage}/{name}", value, prog_bar=name in ("bleu4", "cider", "grounding/precision"),
                     sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def caption_text(self, ids: Tensor | Sequence[int]) -> str:
        """Word ids -> caption text, up to ``<END>`` (:meth:`Vocabulary.decode`)."""
        return self.vocab.decode(ids.reshape(-1) if isinstance(ids, Tensor) else ids)

    # ---------------------------------------------------------------------------------------------
    # Optimisation
    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if self._drop_gradients:  # a skipped non-finite step: torch optimizers leave params without grads alone
            self._drop_gradients = False
            for param in self.parameters():
                param.grad = None
            return
        # The total L2 norm of the gradients, taken before clipping (which comes after this hook) and after
        # AMP unscaling: spikes and drifts show an unstable run before its loss does.
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", nn.utils.get_total_norm(grads), on_step=True, on_epoch=False)

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Lightning's clipping, except that an optimizer able to unscale gradients itself (fused AdamW, the default)
        is clipped here where nothing scales them: Lightning refuses it under every mixed precision, though only
        16-mixed's GradScaler scales gradients — under bf16-mixed (``precision=auto`` on bf16 hardware) and 32-true
        they are the true ones, and clipping them before the step is what the Trainer would do. Under 16-mixed a
        one-paragraph error names the settings that work."""
        if gradient_clip_val and getattr(optimizer, "_step_supports_amp_scaling", False):
            if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
                raise ValueError(
                    f"trainer.gradient_clip_val={gradient_clip_val} cannot clip the gradients of a fused optimizer "
                    "under trainer.precision=16-mixed: its gradients are scaled, and the fused step unscales them "
                    "only inside itself, after clipping would have to happen. Set optimizer.fused=false (or "
                    "trainer.gradient_clip_val=null to train without clipping, or trainer.precision=bf16-mixed).")
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if gradient_clip_algorithm == "value":
                nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _encoder_groups(self) -> list[dict[str, Any]]:
        """The trainable encoder's parameter groups: one at ``encoder_lr`` (None: the optimizer's), or with the
        encoder's layer-wise decay (``lr_scales``) one per depth, at that rate times the depth's factor."""
        named = [(n, p) for n, p in self.encoder.named_parameters() if p.requires_grad]
        if not named:
            return []
        base = self.hparams.encoder_lr
        scales = self.encoder.lr_scales() if hasattr(self.encoder, "lr_scales") else {}
        if not scales:
            return [{"params": [p for _, p in named], "name": "encoder", **({"lr": base} if base is not None else {})}]
        base = base if base is not None else (self.hparams.optimizer or {}).get("lr")
        if base is None:
            raise ValueError("encoder.layer_decay needs a learning rate to scale: set module.encoder_lr or the "
                             "optimizer's lr.")
        by_scale: dict[float, list[Tensor]] = {}
        for name, param in named:
            by_scale.setdefault(scales.get(name, 1.0), []).append(param)
        return [{"params": params, "name": f"encoder@{scale:.3g}", "lr": base * scale}
                for scale, params in sorted(by_scale.items())]

    def configure_optimizers(self) -> Any:
        decoder_params = [p for p in self.decoder.parameters() if p.requires_grad]
        groups = [{"params": decoder_params, "name": "decoder"}, *self._encoder_groups()]
        optimizer = instantiate(self.hparams.optimizer)(groups)
        if not self.hparams.scheduler:
            return optimizer
        # a per-step schedule that needs the run's length or peak rate (OneCycleLR) gets them from the run
        scheduler = fill_run_arguments(instantiate(self.hparams.scheduler), optimizer,
                                       self.trainer.estimated_stepping_batches if self._trainer is not None else None)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": scheduler,
                "interval": self.hparams.scheduler_interval,
                "monitor": self.hparams.scheduler_monitor,
            },
        }


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _running_stats(module: nn.Module) -> list[Tensor]:
    """The running statistics that a training-mode forward of ``module`` updates (BatchNorm layers)."""
    return [stat for m in module.modules() if isinstance(m, _BATCH_NORMS) and m.training and m.track_running_stats
            for stat in (m.running_mean, m.running_var, m.num_batches_tracked) if stat is not None]


def grounding_scorer(datamodule: Any, split: str) -> GroundedScorer | None:
    """The grounded metric the data allows: the built-in set's scenes, else COCO instance annotations."""
    scenes = datamodule.scenes(split) if hasattr(datamodule, "scenes") else {}
    if scenes:
        # a compositional split (captioning.data.holdout): held-out pairs and layouts scored apart
        holdout = getattr(datamodule, "holdout", None)
        if holdout:
            return GroundingScorer(scenes, novel_pairs=holdout.pairs, subsets=holdout.subsets(scenes))
        return GroundingScorer(scenes)
    objects = datamodule.object_categories(split) if hasattr(datamodule, "object_categories") else {}
    return CocoChair(objects) if objects else None


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[CaptioningModule, dict[str, Any]]:
    """A trained module and the config of the DataModule it was trained with ({} when not saved).

    The checkpoint alone rebuilds the model (encoder and decoder config, vocabulary); the DataModule's
    hyperparameters (``image_size``, the data set's root...) tell eval.py and caption.py how it saw images,
    and ``_target_`` (when the checkpoint records it) which DataModule they belong to.
    Raises FileNotFoundError / ValueError naming the file when it is missing or not a trained
    ``CaptioningModule`` checkpoint, rather than a deep traceback from ``torch.load`` or Lightning.
    """
    path = Path(path).expanduser()
    checkpoint = read_checkpoint(path)
    try:
        module = CaptioningModule.load_from_checkpoint(path, map_location=map_location)
    except RuntimeError as error:  # load_state_dict: missing / unexpected keys, size mismatches
        raise ValueError(
            f"The weights in {path} do not fit the model its saved config builds: {error}\nThe model code "
            "changed since this checkpoint was trained; evaluate it with the version that trained it, or retrain."
        ) from error
    data = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    if data and checkpoint.get("datamodule_target"):
        data["_target_"] = checkpoint["datamodule_target"]
    return module, data


def load_ensemble(
    paths: str | Path | Sequence[str | Path], map_location: str | torch.device = "cpu"
) -> tuple[CaptioningModule, dict[str, Any]]:
    """One checkpoint, or several decoding as an ensemble (:meth:`CaptioningModule.set_ensemble`): the first is
    the host (its data config, image contract and loss are the ensemble's), the others its members.

    Raises ValueError naming both files when a member's vocabulary or image input differs from the first's:
    averaging log-probabilities needs the same word ids, and one batch of images must suit every encoder.
    """
    paths = [paths] if isinstance(paths, str | Path) else list(paths)
    module, data = load_checkpoint(paths[0], map_location)
    members = []
    for path in paths[1:]:
        member, _ = load_checkpoint(path, map_location)
        ours, theirs = module.vocab.idx_to_word, member.vocab.idx_to_word
        if ours != theirs:
            first = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))
            word = lambda words, first=first: repr(words[first]) if first < len(words) else "nothing"  # noqa: E731
            raise ValueError(
                f"Cannot ensemble {path} with {paths[0]}: their vocabularies differ ({len(theirs)} vs {len(ours)} "
                f"words; id {first} is {word(theirs)} in one and {word(ours)} in the other). An ensemble averages "
                "the members' word probabilities id by id: use checkpoints trained on the same data with the same "
                "data.min_word_count / data.max_length (e.g. runs that differ only in seed).")
        if member.image_contract != module.image_contract:
            raise ValueError(
                f"Cannot ensemble {path} with {paths[0]}: their encoders read images differently "
                f"({member.image_contract} vs {module.image_contract}), and an ensemble reads each batch once. Use "
                "members trained with the same encoder input (data.image_size and the encoder's normalisation).")
        members.append(member)
    module.set_ensemble(members)
    return module, data
