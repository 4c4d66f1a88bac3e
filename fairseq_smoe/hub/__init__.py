"""Using a trained model: ``from_pretrained`` -> ``transcribe``/``translate`` on audio (hub_interface), long recordings
cut by voice activity (segment), and the hooks behind ``fairseq-interactive`` with audio paths (interactive)."""

from .hub_interface import HubError, SMoEHubInterface, Transcript, from_pretrained
from .segment import Segment, speech_segments

__all__ = ["HubError", "SMoEHubInterface", "Transcript", "from_pretrained", "Segment", "speech_segments"]
