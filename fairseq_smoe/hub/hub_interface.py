"""Run a trained S-MoE model on audio from Python: ``from_pretrained(model_dir)`` -> ``transcribe`` / ``translate``.

The pattern is fairseq's own (``fairseq.hub_utils.from_pretrained`` loads the checkpoint and sets up the task;
an ``nn.Module`` holds task, models and generator, like ``S2THubInterface``), with what S-MoE adds: every input gets
a route (its bandwidth, detected by the data config's rule or given; the task and language, which set the guiding
prefix and the decoder expert), and inputs are turned into a batch by the plugin's own dataset and collater (the same
fbank, ``config.yaml`` feature transforms, guiding prefix, route ids and route plan as ``fairseq-generate``), then
decoded by the task's ``inference_step`` (forced prefix, joint CTC/attention when ``ctc_weight`` > 0). Inputs longer
than ``long_audio_s`` are cut by :mod:`.segment` into speech segments, decoded in the same batches as the rest, and
stitched, with each segment's start/end time.
"""

import contextlib
import copy
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from fairseq import hub_utils, utils
from fairseq.data import data_utils

from ..data import audio
from ..data.dataset import SMoESpeechToTextDataset
from ..data.manifest import waveform_bandwidth
from ..routing import ASR_TASK, ST_TASK, TASK_TO_GUIDING_TOKEN, guiding_token, lang_tag
from . import segment as seg

logger = logging.getLogger(__name__)

AudioInput = Union[str, os.PathLike, np.ndarray, torch.Tensor, Tuple[object, int]]


class HubError(ValueError):
    """A request the model cannot serve (unknown language or bandwidth, bad audio argument); says what to pass."""


@dataclass
class Transcript:
    """What one input decoded to, and the route it took."""

    text: str
    bandwidth: str
    task: str
    lang: str
    duration: float
    score: Optional[float] = None  # the hypothesis' log-probability per token (base e); None when stitched
    tokens: Optional[List[int]] = None
    segments: Optional[List[seg.Segment]] = None  # long inputs only: their pieces, in order
    path: Optional[str] = None

    def to_dict(self) -> dict:
        out = {"path": self.path, "bandwidth": self.bandwidth, "task": self.task, "lang": self.lang,
               "duration": round(self.duration, 3), "text": self.text}
        out["segments"] = None if self.segments is None else [s.to_dict() for s in self.segments]
        return out


def from_pretrained(model_dir, checkpoint_file: str = "checkpoint_best.pt", data_name_or_path: str = ".",
                    config_yaml: str = "config.yaml", device=None, **overrides) -> "SMoEHubInterface":
    """Load ``model_dir/checkpoint_file`` with the data directory ``data_name_or_path`` (relative to ``model_dir``
    when it starts with '.', as in fairseq) holding ``config_yaml``, the dictionary and the SentencePiece model.

    Keyword overrides go to the checkpoint's arguments as in fairseq (e.g. ``ctc_decode_weight=0.3``), except the
    hub's own: ``lang`` (the language ``transcribe`` writes) and ``tgt_lang`` (the default of ``translate``).
    ``device`` (e.g. ``"cuda"``, ``"cuda:1"``) moves the models there, as ``.cuda()`` / ``.to(device)`` do later.
    Loading goes through fairseq's ``checkpoint_utils``, so torch's ``weights_only`` unpickler applies with the
    plugin's allow-list (installed when ``fairseq_smoe`` is imported).
    """
    hub_kwargs = {k: overrides.pop(k) for k in ("lang", "tgt_lang") if k in overrides}
    model_dir = str(model_dir)
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"{model_dir}: model directory not found")
    data = os.path.join(model_dir, data_name_or_path) if data_name_or_path.startswith(".") else data_name_or_path
    for name in checkpoint_file.split(os.pathsep):
        if not os.path.isfile(os.path.join(model_dir, name)):
            raise FileNotFoundError(f"{os.path.join(model_dir, name)}: checkpoint not found")
    if not os.path.isfile(os.path.join(data, config_yaml)):
        raise FileNotFoundError(f"{os.path.join(data, config_yaml)}: data config not found (data_name_or_path "
                                f"names the folder with config.yaml, the dictionary and the SentencePiece model)")
    loaded = hub_utils.from_pretrained(model_dir, checkpoint_file=checkpoint_file, data_name_or_path=str(data),
                                       config_yaml=config_yaml, task="speech_to_text_smoe", **overrides)
    hub = SMoEHubInterface(loaded["args"], loaded["task"], loaded["models"], **hub_kwargs)
    return hub if device is None else hub.to(device)


def dictionary_languages(tgt_dict) -> List[str]:
    """The languages with a ``<lang:xx>`` tag in the dictionary, in dictionary order."""
    head = lang_tag("")[:-1]  # "<lang:"
    return [s[len(head):-1] for s in tgt_dict.symbols if s.startswith(head) and s.endswith(">")]


def resolve_route(task_obj, task: str, tgt_lang: Optional[str], default_lang: Optional[str] = None,
                  default_tgt_lang: Optional[str] = None, option_hint: Optional[Tuple[str, str]] = None) -> dict:
    """The decoder side of a request: manifest task, output language, decoder route id and guiding prefix ids.

    The language is ``tgt_lang``, else the default for the task (ASR: ``default_lang``, ST: ``default_tgt_lang``),
    else the dictionary's only language; else the error says what to pass (``option_hint``: the names of the
    options for a command line, e.g. ``("--force-tgt-lang", "--force-tgt-lang")``).
    """
    if task not in TASK_TO_GUIDING_TOKEN:
        raise HubError(f"task must be one of {sorted(TASK_TO_GUIDING_TOKEN)}, got {task!r}")
    tgt_dict = task_obj.target_dictionary
    languages = dictionary_languages(tgt_dict)
    tags = [lang_tag(x) for x in languages]
    if not tgt_lang:
        tgt_lang = default_lang if task == ASR_TASK else default_tgt_lang
    if not tgt_lang and len(languages) == 1:
        tgt_lang = languages[0]
    if not tgt_lang:
        key = "lang" if task == ASR_TASK else "tgt_lang"
        if option_hint:
            ask = f"pass {option_hint[0] if task == ASR_TASK else option_hint[1]} LANG"
        else:
            ask = f"pass {key}=..., or set it once with from_pretrained(..., {key}=...)"
        raise HubError(f"which language should the {task} output be in? {ask} (the dictionary has {tags}), "
                       f"or set config.yaml's hub: {{{key}: ...}}")
    if tgt_lang not in languages:
        raise HubError(f"language {tgt_lang!r}: {lang_tag(tgt_lang)} is not in the model's dictionary (it has {tags})")
    token = TASK_TO_GUIDING_TOKEN[task]
    try:
        decoder_route = task_obj.routing_table.decoder_route_id(token, tgt_lang)
    except KeyError as e:
        raise HubError(e.args[0]) from None
    prefix = [tgt_dict.index(guiding_token(token)), tgt_dict.index(lang_tag(tgt_lang))]
    return {"task": task, "lang": tgt_lang, "decoder_route": decoder_route, "prefix": prefix}


class _InMemoryDataset(SMoESpeechToTextDataset):
    """The plugin's dataset over 16 kHz waveforms held in memory (``audio_paths`` are only labels).

    Everything but reading is the parent's: the collater (padding, length order, masked prefix, route ids, route
    plan, decoder prefix), batching by route pair, and the ``config.yaml`` feature transforms of a non-train split.
    Feature extraction is the parent's ``_get_source_audio`` for audio files, minus the file reading.
    """

    def __init__(self, waveforms: List[np.ndarray], **kwargs):
        self.waveforms = waveforms
        super().__init__(**kwargs)

    def _get_source_audio(self, index) -> torch.Tensor:
        feats = audio.fbank(self.waveforms[index], self.cfg.input_feat_per_channel)
        if feats.shape[0] == 0:
            raise audio.AudioError(f"{self.audio_paths[index]}: shorter than one 25 ms analysis window")
        if self.feature_transforms is not None:
            with data_utils.numpy_seed(self.seed, self.epoch, int(index)):
                feats = self.feature_transforms(feats)
        return torch.from_numpy(np.ascontiguousarray(feats)).float()


@dataclass
class _Piece:
    """One row to decode: a whole input or one segment of a long one."""

    input_index: int
    wav16k: np.ndarray
    segment: Optional[seg.Segment] = None
    label: str = ""


@dataclass
class _Prepared:
    wav16k: np.ndarray
    label: str
    path: Optional[str] = None
    bandwidth: str = ""
    pieces: List[_Piece] = field(default_factory=list)


class SMoEHubInterface(nn.Module):
    """Task, models and generators of a trained S-MoE model; ``.cuda()`` / ``.to(device)`` moves the models."""

    def __init__(self, cfg, task, models, lang: Optional[str] = None, tgt_lang: Optional[str] = None):
        super().__init__()
        self.cfg = cfg
        self.task = task
        self.models = nn.ModuleList(models)
        for model in self.models:
            model.prepare_for_inference_(cfg)
            model.eval()
        self.tgt_dict = task.target_dictionary
        self.bpe = task.build_bpe(task.args)
        self.languages = dictionary_languages(self.tgt_dict)
        hub_cfg = task.data_cfg.hub or {}
        self.default_lang = lang or hub_cfg.get("lang")
        self.default_tgt_lang = tgt_lang or hub_cfg.get("tgt_lang")
        self._generators: Dict[tuple, object] = {}
        self.register_buffer("_float_tensor", torch.tensor([0], dtype=torch.float), persistent=False)

    @property
    def device(self) -> torch.device:
        return self._float_tensor.device

    @property
    def max_source_frames(self) -> int:
        """The longest input (fbank frames) the task and every model take."""
        limits = utils.resolve_max_positions(self.task.max_positions(), *[m.max_positions() for m in self.models])
        return int(limits[0])

    @property
    def routing_table(self):
        return self.task.routing_table

    # ------------------------------------------------------------------ public API
    def transcribe(self, audio_in, lang: Optional[str] = None, **kwargs):
        """Speech recognition (guiding token of the manifest task ``asr``) into ``lang`` (default: the model's)."""
        return self.generate(audio_in, task=ASR_TASK, tgt_lang=lang, **kwargs)

    def translate(self, audio_in, tgt_lang: Optional[str] = None, **kwargs):
        """Speech translation (manifest task ``st``) into ``tgt_lang``."""
        return self.generate(audio_in, task=ST_TASK, tgt_lang=tgt_lang, **kwargs)

    def generate(
        self,
        audio_in: Union[AudioInput, Sequence[AudioInput]],
        task: str = ASR_TASK,
        tgt_lang: Optional[str] = None,
        sample_rate: Optional[int] = None,
        bandwidth: Optional[str] = None,
        beam: int = 5,
        lenpen: float = 1.0,
        max_len_a: float = 0.0,
        max_len_b: int = 200,
        ctc_weight: Optional[float] = None,
        ctc_prebeam: Optional[int] = None,
        max_tokens: int = 20000,
        max_sentences: Optional[int] = None,
        segment: Union[bool, str] = "auto",
        long_audio_s: float = 30.0,
        vad: str = "auto",
        vad_options: Optional[dict] = None,
    ):
        """Decode one input (returns a :class:`Transcript`) or a list of inputs (returns a list, in input order).

        An input is a path (.wav/.flac/.ogg), a 1-D array or tensor with ``sample_rate``, or an ``(array, rate)``
        pair; rates from 8 to 48 kHz. ``bandwidth`` (``nb``/``wb``) is detected per input by the data config's
        ``smoe.bandwidth_detection`` rule unless given. Inputs are batched by route under ``max_tokens`` fbank
        frames (and ``max_sentences`` rows) per batch. ``segment``: ``"auto"`` cuts inputs longer than
        ``long_audio_s`` seconds into speech segments (``vad``: auto/webrtc/energy, ``vad_options`` for
        :func:`.segment.speech_segments`), ``True`` cuts every input, ``False`` none. ``ctc_weight``: joint
        CTC/attention weight of ASR decoding (default: the checkpoint's ``--ctc-decode-weight``).
        """
        if segment not in (True, False, "auto"):
            raise HubError(f"segment must be True, False or 'auto', got {segment!r}")
        single = _is_single(audio_in)
        inputs = [audio_in] if single else list(audio_in)
        route = self._route(task, tgt_lang)
        prepared = [self._prepare(x, i, sample_rate, bandwidth) for i, x in enumerate(inputs)]
        for p_index, p in enumerate(prepared):
            duration = len(p.wav16k) / audio.TARGET_SAMPLE_RATE
            cut = segment is True or (segment == "auto" and duration > long_audio_s)
            if cut:
                pieces = seg.speech_segments(p.wav16k, audio.TARGET_SAMPLE_RATE, method=vad, **(vad_options or {}))
                for s in pieces:
                    a, b = int(round(s.start * audio.TARGET_SAMPLE_RATE)), int(round(s.end * audio.TARGET_SAMPLE_RATE))
                    p.pieces.append(_Piece(p_index, p.wav16k[a:b], s, f"{p.label}@{s.start:.2f}-{s.end:.2f}"))
            else:
                p.pieces.append(_Piece(p_index, p.wav16k, None, p.label))
        pieces = [piece for p in prepared for piece in p.pieces]
        hypos = self._decode_pieces(pieces, prepared, route, beam=beam, lenpen=lenpen, max_len_a=max_len_a,
                                    max_len_b=max_len_b, ctc_weight=ctc_weight, ctc_prebeam=ctc_prebeam,
                                    max_tokens=max_tokens, max_sentences=max_sentences)
        results = []
        for p in prepared:
            duration = len(p.wav16k) / audio.TARGET_SAMPLE_RATE
            common = dict(bandwidth=p.bandwidth, task=route["task"], lang=route["lang"], duration=duration,
                          path=p.path)
            if len(p.pieces) == 1 and p.pieces[0].segment is None:
                text, score, tokens = hypos[id(p.pieces[0])]
                results.append(Transcript(text=text, score=score, tokens=tokens, **common))
            else:
                segments = []
                for piece in p.pieces:
                    piece.segment.text = hypos[id(piece)][0]
                    segments.append(piece.segment)
                text = " ".join(s.text for s in segments if s.text)
                results.append(Transcript(text=text, segments=segments, **common))
        return results[0] if single else results

    def load_audio(self, path) -> Tuple[np.ndarray, int]:
        """Mono waveform and rate of an audio file, by the plugin's reader (:class:`AudioError` names the file)."""
        return audio.read_waveform(audio.resolve(str(path), None))

    def detect_bandwidth(self, wav: np.ndarray, sr: int) -> str:
        """The bandwidth label by the data config's rule, as the dataset derives it for rows without one
        (``fairseq_smoe.data.manifest.waveform_bandwidth``): the rate, or below 16 kHz always nb; ``spectral`` looks
        at the energy above 4 kHz of audio at 16 kHz or more."""
        return waveform_bandwidth(wav, sr, self.task.smoe_cfg)

    # ------------------------------------------------------------------ internals
    def _route(self, task: str, tgt_lang: Optional[str]) -> dict:
        return resolve_route(self.task, task, tgt_lang, self.default_lang, self.default_tgt_lang)

    def _prepare(self, x, index: int, sample_rate: Optional[int], bandwidth: Optional[str]) -> _Prepared:
        path = None
        if isinstance(x, (str, os.PathLike)):
            path = str(x)
            wav, sr = self.load_audio(path)
            label = path
        else:
            if isinstance(x, tuple) and len(x) == 2:
                x, sr = x
            else:
                sr = sample_rate
            if sr is None:
                raise HubError(f"input {index}: an array needs its sample rate: pass sample_rate=... or (array, rate)")
            wav = _as_mono(x, index)
            sr = int(sr)
            label = f"input {index}"
            if not audio.SUPPORTED_RATES[0] <= sr <= audio.SUPPORTED_RATES[1]:
                raise audio.AudioError(f"{label}: sample rate {sr} Hz outside the supported "
                                       f"{audio.SUPPORTED_RATES[0]}-{audio.SUPPORTED_RATES[1]} Hz")
            if wav.size == 0 or not np.isfinite(wav).all():
                raise audio.AudioError(f"{label}: no samples, or samples that are NaN or inf")
        bw = bandwidth or self.detect_bandwidth(wav, sr)
        try:
            self.routing_table.encoder_route_id(bw)
        except KeyError as e:
            raise HubError(f"{label}: {e.args[0]}") from None
        return _Prepared(wav16k=audio.resample(wav, sr).astype(np.float32, copy=False), label=label, path=path,
                         bandwidth=bw)

    def _generator(self, beam, lenpen, max_len_a, max_len_b, ctc_weight, ctc_prebeam):
        args = self.task.args
        ctc_weight = getattr(args, "ctc_decode_weight", 0.0) if ctc_weight is None else float(ctc_weight)
        ctc_prebeam = getattr(args, "ctc_prebeam", 30) if ctc_prebeam is None else int(ctc_prebeam)
        key = (beam, lenpen, max_len_a, max_len_b, ctc_weight, ctc_prebeam)
        if key not in self._generators:
            gen_cfg = copy.deepcopy(self.cfg.generation)
            gen_cfg.beam, gen_cfg.lenpen, gen_cfg.nbest = beam, lenpen, 1
            gen_cfg.max_len_a, gen_cfg.max_len_b = max_len_a, max_len_b
            # the task reads the joint CTC weight from its own arguments (--ctc-decode-weight): set them for the
            # one call that builds this generator, so that the task's own code wraps the models
            with _task_args(args, ctc_decode_weight=ctc_weight, ctc_prebeam=ctc_prebeam):
                self._generators[key] = self.task.build_generator(list(self.models), gen_cfg)
        return self._generators[key], ctc_weight

    def _dataset(self, pieces: List[_Piece], prepared: List[_Prepared], route: dict) -> _InMemoryDataset:
        table, n = self.routing_table, len(pieces)
        return _InMemoryDataset(
            [p.wav16k for p in pieces],
            split="hub", is_train_split=False, cfg=self.task.data_cfg, smoe_cfg=self.task.smoe_cfg,
            audio_paths=[p.label for p in pieces], n_frames=[audio.num_fbank_frames(len(p.wav16k)) for p in pieces],
            tgt_texts=[""] * n, speakers=[""] * n, src_langs=[""] * n, tgt_langs=[route["lang"]] * n,
            ids=[str(i) for i in range(n)], tasks=[route["task"]] * n,
            bandwidths=[prepared[p.input_index].bandwidth for p in pieces],
            encoder_routes=[table.encoder_route_id(prepared[p.input_index].bandwidth) for p in pieces],
            decoder_routes=[route["decoder_route"]] * n, prefixes=[route["prefix"]] * n, tgt_dict=self.tgt_dict,
        )

    def _decode_pieces(self, pieces: List[_Piece], prepared: List[_Prepared], route: dict, max_tokens,
                       max_sentences, **gen) -> Dict[int, tuple]:
        from fairseq_cli.generate import get_symbols_to_strip_from_output

        if not pieces:
            return {}
        generator, _ = self._generator(**gen)
        # fairseq logs, for every dataset, that 'transforms' is its old name for 'feature_transforms', its repr and
        # the out-of-vocabulary rate of the (empty) targets: noise for every call
        with _quiet("fairseq.data.audio.data_cfg", "fairseq.data.audio.speech_to_text_dataset"):
            dataset = self._dataset(pieces, prepared, route)
        max_frames = self.max_source_frames
        for i, p in enumerate(pieces):
            if dataset.n_frames[i] == 0:
                raise audio.AudioError(f"{p.label}: shorter than one 25 ms analysis window")
            if dataset.n_frames[i] > max_frames:
                raise HubError(f"{p.label}: {dataset.n_frames[i]} fbank frames, more than the model's "
                               f"{max_frames} source positions; cut it into segments (segment=True or 'auto' "
                               f"with a smaller long_audio_s)")
        batches = dataset.batch_by_size(dataset.ordered_indices(), max_tokens=max_tokens, max_sentences=max_sentences)
        strip = get_symbols_to_strip_from_output(generator)
        out: Dict[int, tuple] = {}
        for batch_indices in batches:
            sample = dataset.collater([dataset[int(i)] for i in batch_indices])
            if self.device.type == "cuda":
                sample = utils.move_to_cuda(sample, device=self.device)
            hypos = self.task.inference_step(generator, list(self.models), sample)
            for row, sample_id in enumerate(sample["id"].tolist()):
                best = hypos[row][0]
                tokens = best["tokens"].int().cpu()
                text = self.tgt_dict.string(tokens, extra_symbols_to_ignore=strip)
                if self.bpe is not None:
                    text = self.bpe.decode(text)
                out[id(pieces[sample_id])] = (text, float(best["score"]), tokens.tolist())
        return out


@contextlib.contextmanager
def _quiet(*logger_names: str):
    logs = [logging.getLogger(name) for name in logger_names]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)


@contextlib.contextmanager
def _task_args(args, **values):
    old = {k: getattr(args, k, None) for k in values}
    try:
        for k, v in values.items():
            setattr(args, k, v)
        yield
    finally:
        for k, v in old.items():
            setattr(args, k, v)


def _is_single(x) -> bool:
    if isinstance(x, (str, os.PathLike, np.ndarray, torch.Tensor)):
        return True
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], (int, np.integer))


def _as_mono(x, index: int) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy()
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 2 and 1 in x.shape:
        x = x.reshape(-1)
    if x.ndim != 1:
        raise HubError(f"input {index}: audio must be mono, 1-D (or 1 x T), got shape {x.shape}")
    return x
