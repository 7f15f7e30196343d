"""Training objectives: what the LightningModule minimises in a training step (``conf/objective``).

- :class:`CrossEntropy` (``objective=xe``): the courses' teacher-forced masked temporal softmax loss.
- :class:`SelfCritical` (``objective=scst``): self-critical sequence training (Rennie et al., CVPR 2017).
  For every image, K captions are sampled from the model (batched over images and samples: one decoding
  loop for the N*K rows) and rewarded with their CIDEr-D against the image's references, with document
  frequencies from the training split. The baseline is the model's own greedy caption (``greedy``, the
  paper's) or the mean reward of the image's other K-1 samples (``mean``, Luo 2020). The loss is REINFORCE
  with that baseline::

      loss = - 1/(N K) sum_i (r_i - b_i) log p(w_i)       log p(w_i) = sum_t log p(w_it), up to its <END>

  computed as a per-row weighted temporal softmax loss over the samples (the fused vocabulary projection:
  the (N K, T, V) scores never exist), plus ``xe_weight`` times the cross-entropy loss if asked.

The samples are drawn without gradients, with the greedy baseline's rows in the same decoding loop. With the
attention core and no dropout (the default) the policy gradient comes from the sampling steps themselves, as
they were taken (``bptt.attention_lstm_replay``: the hand-written BPTT on the recorded activations); otherwise
the samples are scored again teacher-forced through the core, which is the same distribution when the decoder
has no dropout; with dropout the two passes use different masks.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .metrics import CiderD, tokenize
from .models import CaptioningRNN
from .models.bptt import AttentionStep
from .models.captioner import DecoderState
from .models.decoding import BAD_ENDINGS, StepRules, step_decode

__all__ = ["BASELINES", "BAD_ENDINGS", "CrossEntropy", "Objective", "SelfCritical"]

BASELINES = ("greedy", "mean")
UNK_ID = 3  # the vocabulary's contract: <NULL> 0, <START> 1, <END> 2, <UNK> 3, then the words
BAD_ENDING_MODES = ("none", "penalize", "forbid")


class Objective:
    """What a training step minimises. ``setup`` prepares what it needs from the data once per fit; ``__call__``
    returns the loss and the numbers to log (as tensors, logged under ``train/``)."""

    def setup(self, datamodule: Any, trainer: Any = None) -> None:  # noqa: B027 - optional hook
        """Called once per fit, on every process, with the DataModule (``vocab``, ``references("train")``) and the
        Lightning Trainer (``world_size``, ``strategy``, ``default_root_dir``; None outside a fit)."""

    def __call__(self, decoder: CaptioningRNN, features: Tensor, batch: Mapping[str, Any]) -> tuple[Tensor, dict]:
        raise NotImplementedError


class CrossEntropy(Objective):
    """The teacher-forced masked temporal softmax (cross-entropy) loss of the courses (``objective=xe``).

    Args:
        label_smoothing: eps of label smoothing (Szegedy et al. 2016): the target is (1 - eps) the reference
            word + eps uniform over the vocabulary (:mod:`captioning.models.loss`).
        input_noise: the probability that a fed word (not ``<START>``) is replaced while the targets stay the
            reference's, so the decoder cannot predict a word from the one before alone (after "red" it must look
            at the image to say "star"); 0 = the courses' teacher forcing.
        noise: what replaces a fed word: ``"uniform"`` (a word drawn uniformly from the vocabulary: data noising,
            Xie et al. 2017) or ``"model"`` (the word the model itself predicted there, from a teacher-forced pass
            without gradients: parallel scheduled sampling, Duckworth et al. 2019).
        image_dropout: the fraction of captions trained with zero features in place of their image, so that the
            decoder also learns the captions' language alone: the prior classifier-free guidance subtracts when
            decoding (``decoding.guidance=auto``). 0 in code (the courses' loss, and how checkpoints from before it
            were trained); the project's config sets 0.15.

    Measured on the built-in set's held-out pairs (README, "Generalisation"): image dropout with guidance lifts
    the held-out pairs' recall; label smoothing, input noise and weight decay did not.
    """

    NOISE = ("uniform", "model")

    def __init__(self, label_smoothing: float = 0.0, input_noise: float = 0.0, noise: str = "uniform",
                 image_dropout: float = 0.0) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"objective.label_smoothing must be in [0, 1), got {label_smoothing!r}.")
        if not 0.0 <= input_noise <= 1.0:
            raise ValueError(f"objective.input_noise must be a probability in [0, 1], got {input_noise!r}.")
        if noise not in self.NOISE:
            raise ValueError(f"objective.noise={noise!r} is not one of {', '.join(self.NOISE)}.")
        if not 0.0 <= image_dropout < 1.0:
            raise ValueError(f"objective.image_dropout must be a probability in [0, 1), got {image_dropout!r}.")
        self.label_smoothing, self.input_noise, self.noise = float(label_smoothing), float(input_noise), noise
        self.image_dropout = float(image_dropout)

    def __call__(self, decoder: CaptioningRNN, features: Tensor, batch: Mapping[str, Any]) -> tuple[Tensor, dict]:
        captions = batch["captions"]
        if self.image_dropout:
            # the caption without its image: the decoder also learns the language prior, which guided decoding
            # subtracts (decoding.guidance)
            keep = torch.rand(features.shape[0], device=features.device) >= self.image_dropout
            features = features * keep.view(-1, *[1] * (features.dim() - 1)).to(features.dtype)
        inputs = self.noisy_inputs(decoder, features, captions) if self.input_noise else None
        return decoder(features, captions, inputs=inputs, label_smoothing=self.label_smoothing), {}

    def noisy_inputs(self, decoder: CaptioningRNN, features: Tensor, captions: Tensor) -> Tensor:
        """captions (N, T+1) -> the words to feed (N, T): ``captions[:, :-1]`` with a fraction ``input_noise`` of
        its words (ids above the special tokens', after ``<START>``) replaced."""
        fed = captions[:, :-1]
        first_word = max(decoder.null_id, decoder.start_id, decoder.end_id, UNK_ID) + 1
        replace = (torch.rand(fed.shape, device=fed.device) < self.input_noise) & (fed >= first_word)
        replace[:, 0] = False
        if self.noise == "uniform":
            other = torch.randint(first_word, decoder.vocab_size, fed.shape, device=fed.device)
        else:
            with torch.no_grad():
                _, scores = decoder(features, captions, return_scores=True)
            # the prediction at position t is the word fed at t + 1
            other = torch.cat([fed[:, :1], scores[:, :-1].argmax(dim=-1)], dim=1)
        return torch.where(replace & (other >= first_word), other, fed)

    def __repr__(self) -> str:
        return (f"CrossEntropy(label_smoothing={self.label_smoothing}, input_noise={self.input_noise}, "
                f"noise={self.noise!r})")


class SelfCritical(Objective):
    """Self-critical sequence training with a CIDEr-D reward (see the module docstring).

    Args:
        num_samples: K, captions sampled per image.
        temperature: sampling temperature (1 = the model's distribution).
        baseline: ``"mean"`` (the mean reward of the image's other K-1 samples, Luo 2020; needs K >= 2; measured
            better on the built-in set) or ``"greedy"`` (the greedy caption's reward, the paper's).
        xe_weight: weight of the cross-entropy loss added to the policy loss (0: none).
        max_length: the most words a sample has (``<END>`` included).
        bad_endings: the words a caption should not end on (None: ``BAD_ENDINGS``).
        bad_ending: ``"penalize"`` (subtract ``bad_ending_penalty`` from the reward of a sample whose last
            word is one of them), ``"forbid"`` (``<END>`` cannot follow such a word while sampling) or ``"none"``.
        bad_ending_penalty: the penalty for ``"penalize"``.
        max_rows: decode the N*K samples in chunks of at most this many rows (memory).
        sigma: CIDEr-D's length-penalty width.
    """

    def __init__(self, num_samples: int = 5, temperature: float = 1.0, baseline: str = "mean",
                 xe_weight: float = 0.0, max_length: int = 16, bad_endings: Sequence[str] | None = None,
                 bad_ending: str = "penalize", bad_ending_penalty: float = 1.0, max_rows: int = 4096,
                 sigma: float = 6.0) -> None:
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"objective.num_samples must be a positive integer, got {num_samples!r}.")
        if baseline not in BASELINES:
            raise ValueError(f"objective.baseline={baseline!r} is not one of {', '.join(BASELINES)}.")
        if baseline == "mean" and num_samples < 2:
            raise ValueError("objective.baseline=mean is the mean reward of an image's other samples: it needs "
                             f"objective.num_samples >= 2, got {num_samples}.")
        if bad_ending not in BAD_ENDING_MODES:
            raise ValueError(f"objective.bad_ending={bad_ending!r} is not one of {', '.join(BAD_ENDING_MODES)}.")
        if temperature <= 0 or xe_weight < 0 or max_length < 1 or max_rows < 1:
            raise ValueError(
                f"objective: temperature must be > 0, xe_weight >= 0, max_length and max_rows >= 1; got "
                f"{temperature}, {xe_weight}, {max_length}, {max_rows}.")
        self.num_samples, self.temperature, self.baseline = num_samples, float(temperature), baseline
        self.xe_weight, self.max_length, self.max_rows = float(xe_weight), int(max_length), int(max_rows)
        bad_endings = BAD_ENDINGS if bad_endings is None else bad_endings
        if not all(isinstance(w, str) for w in bad_endings):
            raise ValueError(f"objective.bad_endings must be words, got {list(bad_endings)!r} (quote on / no / yes in "
                             "YAML, which reads them as booleans).")
        self.bad_endings = tuple(bad_endings)
        self.bad_ending, self.bad_ending_penalty = bad_ending, float(bad_ending_penalty)
        self.sigma = float(sigma)
        self.cider: CiderD | None = None
        self.vocab: Any = None
        self._bad_ids: Tensor | None = None

    def __repr__(self) -> str:
        return (f"SelfCritical(num_samples={self.num_samples}, temperature={self.temperature}, "
                f"baseline={self.baseline!r}, xe_weight={self.xe_weight}, bad_ending={self.bad_ending!r})")

    # -------------------------------------------------------------------------------------------
    def setup(self, datamodule: Any, trainer: Any = None) -> None:
        """The reward's document frequencies, from the training split's references. Under DDP they are built once,
        on rank 0, and read by every process from a file beside the run, so all ranks reward with the same
        numbers; a process that cannot see the file (nodes without a shared disk) builds its own, equal ones."""

        def build() -> CiderD:
            return CiderD(datamodule.references("train"), sigma=self.sigma)

        if trainer is None or trainer.world_size == 1:
            self.use_references(build(), datamodule.vocab)
            return
        strategy = trainer.strategy
        path = Path(trainer.default_root_dir) / "objective" / "train_references.pt"
        if strategy.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(build(), path)
        strategy.barrier("objective-references")
        if strategy.is_global_zero or not path.is_file():
            cider = torch.load(path, weights_only=False) if path.is_file() else build()
        else:
            cider = torch.load(path, weights_only=False)  # our own file, written a moment ago by rank 0
        self.use_references(cider, datamodule.vocab)

    def use_references(self, references: Mapping[int, Sequence[str]] | CiderD, vocab: Any) -> None:
        """Reward against these references (or a CiderD built from them) with this vocabulary's words."""
        self.cider = references if isinstance(references, CiderD) else CiderD(dict(references), sigma=self.sigma)
        self.vocab = vocab
        self._bad_ids = torch.tensor([vocab.word_to_idx[w] for w in self.bad_endings if w in vocab.word_to_idx],
                                     dtype=torch.long)

    def rewards(self, image_ids: Sequence[int], captions: Tensor) -> np.ndarray:
        """CIDEr-D of each caption (M, L) of token ids against its image's references: (M,) float64.

        Vectorised over the captions: one scoring pass per sample index (the rows of one index are distinct
        images), no Python loop over images.
        """
        if self.cider is None:
            raise RuntimeError("SelfCritical.setup() was not called: the reward needs the training references.")
        texts = self.vocab.decode_batch(captions)
        ids = [int(i) for i in image_ids]
        rewards = np.empty(len(ids), dtype=np.float64)
        # rows with the same image id cannot share one pass (the scorer matches one hypothesis per image)
        order = np.argsort(ids, kind="stable")
        rank = np.empty(len(ids), dtype=np.int64)
        sorted_ids = np.asarray(ids)[order]
        first = np.r_[True, sorted_ids[1:] != sorted_ids[:-1]] if len(ids) else np.zeros(0, dtype=bool)
        run_start = np.maximum.accumulate(np.where(first, np.arange(len(ids)), 0))
        rank[order] = np.arange(len(ids)) - run_start  # 0 for an id's first row, 1 for its second...
        for k in range(int(rank.max(initial=-1)) + 1):
            rows = np.flatnonzero(rank == k)
            rewards[rows] = self.cider.score_tokens([ids[r] for r in rows], [tokenize(texts[r]) for r in rows])
        return rewards

    # -------------------------------------------------------------------------------------------
    def _decode(self, decoder: CaptioningRNN, state: DecoderState, num_sampled: int) -> tuple[Tensor, Tensor]:
        """Decode every row of ``state`` (no gradients): the first ``num_sampled`` rows draw their words, the
        rest take the argmax (the greedy baseline), all in one loop, in chunks of ``max_rows``. Returns the
        captions (rows, L) and the mean entropy of the sampling distribution over the sampled rows' steps."""
        rows = state.h.shape[0]
        # bad_ending=forbid: no <END> right after a bad ending word, the rule every decoder has (StepRules); the
        # greedy baseline decodes under the same rule as the samples
        rules = StepRules(bad_ids=self._bad_ids, end_id=decoder.end_id) if self.bad_ending == "forbid" else None
        end, null, temperature = decoder.end_id, decoder.null_id, self.temperature
        entropy = [state.h.new_zeros((), dtype=torch.float32), state.h.new_zeros((), dtype=torch.long)]
        chunks = []
        for start in range(0, rows, self.max_rows):
            stop = min(rows, start + self.max_rows)
            chunk = state if stop - start == rows else state.index_select(torch.arange(start, stop,
                                                                                       device=state.h.device))
            sampled = torch.arange(start, stop, device=state.h.device) < num_sampled
            has_greedy = stop > num_sampled  # known here: no device sync per step

            def draw(log_probs: Tensor, previous: Tensor, sampled: Tensor = sampled,
                     has_greedy: bool = has_greedy) -> tuple[Tensor, Tensor]:
                tempered = (log_probs / temperature).log_softmax(dim=1)
                live = (previous != end) & (previous != null) & sampled
                p = tempered.exp()
                entropy[0] = entropy[0] - (p * tempered.nan_to_num(neginf=0.0)).sum(dim=1)[live].sum()
                entropy[1] = entropy[1] + live.sum()  # a tensor: no device sync per step
                words = torch.multinomial(p, 1).squeeze(1)
                if has_greedy:
                    words = torch.where(sampled, words, log_probs.argmax(dim=1))
                return words, tempered.gather(1, words.unsqueeze(1)).squeeze(1)

            chunks.append(step_decode(decoder, chunk.h, self.max_length, draw, rules, state=chunk).captions)
        return torch.cat(chunks), entropy[0] / entropy[1].clamp(min=1)

    @torch.no_grad()
    def sample(self, decoder: CaptioningRNN, features: Tensor) -> tuple[Tensor, Tensor]:
        """K samples per image (N*K rows, image-major) and the mean entropy of the sampling distribution."""
        rows = torch.arange(features.shape[0], device=features.device).repeat_interleave(self.num_samples)
        return self._decode(decoder, decoder.init_state(features).index_select(rows), len(rows))

    def replays(self, decoder: CaptioningRNN, rows: int) -> bool:
        """Whether the policy loss differentiates the sampling steps as they were taken (attention core, no
        dropout, one decoding chunk) instead of running the teacher-forced forward over the samples again."""
        return (decoder.cell_type == "attention" and rows <= self.max_rows
                and not (decoder.training and decoder.dropout.p > 0))

    def __call__(self, decoder: CaptioningRNN, features: Tensor, batch: Mapping[str, Any]) -> tuple[Tensor, dict]:
        captions_features = features
        if "image_index" in batch:  # an image with several captions in the batch is sampled for once
            index = batch["image_index"]
            first = torch.ones_like(index, dtype=torch.bool)
            first[1:] = index[1:] != index[:-1]
            features = features[first]
            image_ids = batch["image_ids"][first].tolist()
        else:
            image_ids = batch["image_ids"].tolist()
        K, N = self.num_samples, features.shape[0]
        greedy = self.baseline == "greedy"
        # the state is computed once per image (with gradients) and repeated: K sample rows per image, image-major,
        # then (greedy baseline) one greedy row per image
        state = decoder.init_state(features)
        sample_rows = torch.arange(N, device=features.device).repeat_interleave(K)
        rows = torch.cat([sample_rows, torch.arange(N, device=features.device)]) if greedy else sample_rows
        replay = self.replays(decoder, len(rows))
        tic = time.perf_counter()
        with torch.no_grad():  # the decoding's copy of the state, outside the graph
            decoding = dataclasses.replace(state.index_select(rows), steps=[] if replay else None)
            captions, entropy = self._decode(decoder, decoding, N * K)
        samples, greedy_captions = captions[:N * K], captions[N * K:]
        decode_seconds = time.perf_counter() - tic

        tic = time.perf_counter()
        sample_ids = np.repeat(image_ids, K)
        reward = self.rewards(sample_ids, samples)
        if self.bad_ending == "penalize" and len(self._bad_ids):
            reward = reward - self.bad_ending_penalty * self._ends_badly(samples).cpu().numpy()
        reward_t = torch.as_tensor(reward, dtype=torch.float32, device=features.device).view(-1, K)
        if greedy:
            greedy_reward = self.rewards(image_ids, greedy_captions)
            baseline = torch.as_tensor(greedy_reward, dtype=torch.float32, device=features.device)
            baseline = baseline.unsqueeze(1).expand(-1, K)
        else:
            baseline = self.mean_baseline(reward_t)
        reward_seconds = time.perf_counter() - tic
        advantage = (reward_t - baseline).reshape(-1)

        if replay:
            steps = decoding.steps if not greedy else [AttentionStep(*(t[:N * K] for t in s)) for s in decoding.steps]
            replayed = dataclasses.replace(state.index_select(sample_rows), steps=steps)
            loss = self.policy_loss(decoder, None, samples[:, :len(steps)], advantage, replay=replayed)
        else:
            loss = self.policy_loss(decoder, features.repeat_interleave(K, dim=0), samples, advantage)
        logs = {
            "scst/reward": reward_t.mean(), "scst/baseline": baseline.mean(), "scst/advantage_std": advantage.std(),
            "scst/sample_length": samples.ne(decoder.null_id).sum(dim=1).float().mean(),
            "scst/ended": samples.eq(decoder.end_id).any(dim=1).float().mean(), "scst/entropy": entropy,
            "scst/decode_seconds": torch.tensor(decode_seconds), "scst/reward_seconds": torch.tensor(reward_seconds),
        }
        if self.xe_weight:
            xe = decoder(captions_features, batch["captions"])
            logs["scst/xe_loss"] = xe.detach()
            loss = loss + self.xe_weight * xe
        return loss, logs

    @staticmethod
    def mean_baseline(reward: Tensor) -> Tensor:
        """reward (N, K) -> each sample's baseline: the mean reward of its image's other K-1 samples."""
        K = reward.shape[1]
        return (reward.sum(dim=1, keepdim=True) - reward) / (K - 1)

    def _ends_badly(self, samples: Tensor) -> Tensor:
        """(M,) whether each sample's last word before <END> (or at the length limit) is a bad ending."""
        lengths = samples.ne(self.vocab.null_id).sum(dim=1)
        ended = samples.eq(self.vocab.end_id).any(dim=1)
        last = (lengths - 1 - ended.long()).clamp(min=0)
        words = samples.gather(1, last.unsqueeze(1)).squeeze(1)
        return torch.isin(words, self._bad_ids.to(samples.device)) & (lengths > ended.long())

    @staticmethod
    def policy_loss(decoder: CaptioningRNN, features: Tensor | None, samples: Tensor, advantage: Tensor,
                    replay: DecoderState | None = None) -> Tensor:
        """REINFORCE: -1/M sum_i advantage_i log p(sample_i | image_i); features (M, ...), samples (M, L) as the
        decoders return them (no <START>, <NULL> after <END>), advantage (M,). ``replay``: the samples' initial
        state with the L steps that drew them recorded (``CaptioningRNN.hidden_states``), in place of features."""
        return decoder(features, decoder.with_start(samples), weights=advantage, decoding_distribution=True,
                       normalize="batch", replay=replay)
