"""Pure-torch model code: the hand-written recurrent core, the loss, encoders and the captioner."""

from .captioner import CELL_TYPES, CaptioningRNN, DecoderState
from .loss import temporal_softmax_loss

__all__ = ["CELL_TYPES", "CaptioningRNN", "DecoderState", "temporal_softmax_loss"]
