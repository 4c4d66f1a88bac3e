"""``fairseq-interactive DATA --user-dir fairseq_smoe --task speech_to_text_smoe --path CKPT`` with audio paths on stdin.

fairseq's S2T task reads the paths with ``get_features_or_waveform``, which needs ``torchaudio.sox_effects`` (gone
from torchaudio >= 2.9), and builds a stock dataset with no guiding prefix or routes. These functions, which the
task's methods delegate to, read the paths with the plugin's audio reader and build the plugin's dataset: the
bandwidth of each file by the data config's rule (as for manifest rows without one), the task and language from
``--force-task`` / ``--force-tgt-lang`` (default: ASR, in config.yaml's ``hub: {lang: ..}`` or the dictionary's only
language; ST: ``hub: {tgt_lang: ..}``).

fairseq-interactive then hands ``inference_step`` only ``src_tokens`` and ``src_lengths`` of each batch, dropping
the route ids, route plan and guiding prefix the collater made. The dataset built here batches by route pair (one
bandwidth and task per batch) and queues each batch's route on the task as the iterator cuts them; fairseq's loop
decodes the batches in that order, so :func:`restore_routes` takes the next one off the queue and checks that its
size and frame counts are the batch's before putting the routes back.
"""

import dataclasses
from collections import deque
from typing import List, Optional

import numpy as np
import torch

from ..data import audio
from ..data.dataset import SMoESpeechToTextDataset
from ..data.manifest import derive_bandwidth
from ..routing import ASR_TASK, RoutePlan
from .hub_interface import HubError, resolve_route

QUEUE_ATTR = "_smoe_interactive_batches"


class InteractiveError(ValueError):
    """An input line fairseq-interactive cannot decode; the message names the line and what to do."""


def _route_of(task) -> dict:
    hub_cfg = task.data_cfg.hub or {}
    name = getattr(task.args, "force_task", None) or ASR_TASK
    try:
        return resolve_route(task, name, getattr(task.args, "force_tgt_lang", None), hub_cfg.get("lang"),
                             hub_cfg.get("tgt_lang"), option_hint=("--force-tgt-lang", "--force-tgt-lang"))
    except HubError as e:
        raise InteractiveError(f"fairseq-interactive: {e}") from None


def get_interactive_tokens_and_lengths(task, lines: List[str], encode_fn=None):
    """The paths themselves (the dataset reads them) and their fbank frame counts, by the plugin's reader."""
    _route_of(task)  # a missing language is an error before any audio is read
    n_frames = []
    for n, line in enumerate(lines, start=1):
        path = line.strip()
        try:
            n_frames.append(audio.check_source(audio.resolve(path, None)))
        except audio.AudioError as e:
            raise InteractiveError(
                f"fairseq-interactive input line {n}: {e}. Each line must be one audio file path "
                f"(python -m fairseq_smoe.cli.transcribe reports bad files and goes on with the rest)"
            ) from None
    return [line.strip() for line in lines], n_frames


class InteractiveDataset(SMoESpeechToTextDataset):
    """The plugin's dataset over the paths of one input buffer; queues each batch's routes on the task."""

    def __init__(self, task, **kwargs):
        self._task = task
        super().__init__(**kwargs)

    def batch_by_size(self, indices, max_tokens=None, max_sentences=None, required_batch_size_multiple=1):
        batches = super().batch_by_size(indices, max_tokens, max_sentences, required_batch_size_multiple)
        queue = deque()
        for batch in batches:
            batch = np.asarray(batch, dtype=np.int64)
            queue.append({
                "encoder": int(self.encoder_routes[batch[0]]), "decoder": int(self.decoder_routes[batch[0]]),
                "prefix": self.prefixes[int(batch[0])], "n_frames": sorted(int(self.n_frames[i]) for i in batch),
            })
        setattr(self._task, QUEUE_ATTR, queue)
        return batches


def build_dataset_for_inference(task, src_tokens: List[str], src_lengths: List[int], **kwargs):
    """An :class:`InteractiveDataset` of the paths ``src_tokens``, one route pair per batch."""
    if kwargs.get("constraints") is not None:
        raise InteractiveError("fairseq-interactive --constraints: not supported by speech_to_text_smoe")
    route = _route_of(task)
    table = task.routing_table
    n = len(src_tokens)
    bandwidths = []
    for path in src_tokens:
        try:
            bandwidths.append(derive_bandwidth(audio.resolve(path, None), task.smoe_cfg))
        except audio.AudioError as e:
            raise InteractiveError(f"fairseq-interactive: {e}") from None
    # one route pair per batch, whatever config.yaml says: restore_routes gives each batch one route
    smoe_cfg = dataclasses.replace(task.smoe_cfg, homogeneous_batches=True)
    return InteractiveDataset(
        task, split="interactive", is_train_split=False, cfg=task.data_cfg, smoe_cfg=smoe_cfg,
        audio_paths=list(src_tokens), n_frames=list(src_lengths), tgt_texts=[""] * n, speakers=[""] * n,
        src_langs=[""] * n, tgt_langs=[route["lang"]] * n, ids=[str(i) for i in range(n)],
        tasks=[route["task"]] * n, bandwidths=bandwidths,
        encoder_routes=[table.encoder_route_id(b) for b in bandwidths], decoder_routes=[route["decoder_route"]] * n,
        prefixes=[route["prefix"]] * n, tgt_dict=task.target_dictionary,
    )


def restore_routes(task, sample: dict) -> dict:
    """``sample`` with route ids, route plan and guiding prefix; unchanged when it has them (fairseq-generate)."""
    if "decoder_prefix" in sample:
        return sample
    queue: Optional[deque] = getattr(task, QUEUE_ATTR, None)
    net_input = sample["net_input"]
    lengths = net_input["src_lengths"]
    if not queue:
        raise InteractiveError(
            "speech_to_text_smoe got a batch without guiding prefix or routes from outside its dataset; decode "
            "with fairseq-generate (a manifest), fairseq-interactive (audio paths) or fairseq_smoe.hub"
        )
    routes = queue.popleft()
    if sorted(lengths.tolist()) != routes["n_frames"]:
        raise InteractiveError(
            f"fairseq-interactive batch of {lengths.numel()} rows does not match the next batch the dataset cut "
            f"({len(routes['n_frames'])} rows): batches came out of order"
        )
    bsz, device = lengths.numel(), lengths.device
    enc = torch.full((bsz,), routes["encoder"], dtype=torch.long)
    dec = torch.full((bsz,), routes["decoder"], dtype=torch.long)
    net_input = dict(net_input, encoder_route_ids=enc.to(device), decoder_route_ids=dec.to(device),
                     route_plan=RoutePlan(enc.numpy(), dec.numpy()))
    prefix = routes["prefix"].unsqueeze(0).expand(bsz, -1).contiguous()
    return dict(sample, net_input=net_input, decoder_prefix=prefix.to(device))
