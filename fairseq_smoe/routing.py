"""Supervised routing: the expert a sample uses is named by its metadata, never chosen by a learned gate.

Encoder experts are keyed by input bandwidth (``wb``, ``nb``); decoder experts by the task guiding token
(``transcribe``, ``translate``), optionally refined by target language (``translate:de``). The lists live in
``config.yaml`` (``smoe: {encoder_routes: [...], decoder_routes: [...]}``), and so do the manifest tasks and their
guiding tokens (``smoe.tasks``) and the tasks scored as ASR (``smoe.asr_tasks``), so a new bandwidth, task or
language is one more entry there, its guiding token in the vocabulary and one more expert in the model, with no code
change (``tests/test_third_route.py`` adds a ``summarize`` route so).

This module is the route contract: the guiding prefix (:data:`PREFIX_LEN`, :meth:`RoutingTable.prefix_symbols`),
which rows are ASR rows (:meth:`RoutingTable.asr_rows`, carried per batch in :class:`RoutePlan`), the batching key
(:meth:`RoutingTable.batch_keys`) and the guiding symbols of a dictionary are asked of it, never restated.
"""

import functools
from contextlib import contextmanager
from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import numpy as np
import torch

# The bandwidth labels a row's audio carries (manifest ``bandwidth`` column). The paper sends WB speech to E0 and NB
# speech to E1: the default encoder routes are the labels in this order.
WB, NB = "wb", "nb"
BANDWIDTHS: Tuple[str, ...] = (WB, NB)
DEFAULT_ENCODER_ROUTES: Tuple[str, ...] = BANDWIDTHS
DEFAULT_DECODER_ROUTES: Tuple[str, ...] = ("transcribe", "translate")

# Manifest ``task`` values and the guiding token each puts at the start of the target (``smoe.tasks`` in config.yaml
# replaces this mapping, e.g. to add ``sum: summarize``).
ASR_TASK, ST_TASK = "asr", "st"
TASK_TO_GUIDING_TOKEN: Dict[str, str] = {ASR_TASK: "transcribe", ST_TASK: "translate"}
# The tasks whose target is the transcript of the audio (``smoe.asr_tasks``): their rows are scored by WER, get the
# auxiliary CTC loss and joint CTC/attention decoding; the rows of every other task are scored by BLEU.
DEFAULT_ASR_TASKS: Tuple[str, ...] = (ASR_TASK,)

# The guiding prefix every target starts with: the task's guiding token, then the target-language tag. Fed to the
# decoder, never scored, forced at generation.
PREFIX_LEN = 2
LANG_TAG_TEMPLATE = "<lang:{}>"


def is_asr_task(task: str, asr_tasks: Sequence[str] = DEFAULT_ASR_TASKS) -> bool:
    """Rows of this manifest ``task`` are scored by WER (and get the auxiliary CTC loss); the others by BLEU."""
    return task in asr_tasks


def smoe_config(encoder_routes: Sequence[str] = DEFAULT_ENCODER_ROUTES,
                decoder_routes: Sequence[str] = DEFAULT_DECODER_ROUTES,
                tasks: Optional[Mapping[str, str]] = None,
                asr_tasks: Optional[Sequence[str]] = None) -> Dict:
    """The ``smoe:`` section of a data directory's ``config.yaml`` (what every prep pipeline writes).

    ``tasks``/``asr_tasks`` are written only when given: the defaults (:data:`TASK_TO_GUIDING_TOKEN`,
    :data:`DEFAULT_ASR_TASKS`) need no entry.
    """
    out: Dict = {"encoder_routes": list(encoder_routes), "decoder_routes": list(decoder_routes)}
    if tasks is not None:
        out["tasks"] = dict(tasks)
    if asr_tasks is not None:
        out["asr_tasks"] = list(asr_tasks)
    return out


def guiding_token(name: str) -> str:
    """``transcribe`` -> ``<transcribe>``."""
    return f"<{name}>"


def lang_tag(lang: str) -> str:
    """``es`` -> ``<lang:es>`` (fairseq's S2T language-tag format)."""
    return LANG_TAG_TEMPLATE.format(lang)


def is_lang_tag(symbol: str) -> bool:
    """Whether a dictionary symbol is a target-language tag (``<lang:xx>``)."""
    head, tail = LANG_TAG_TEMPLATE.split("{}")
    return symbol.startswith(head) and symbol.endswith(tail) and len(symbol) > len(head) + len(tail)


def language_route(task_token: str, lang: str) -> str:
    """The decoder route of one task and target language (``translate`` + ``de`` -> ``translate:de``): a config may
    list these instead of the task's route, for one expert per language."""
    return f"{task_token}:{lang}"


def route_token(route: str) -> str:
    """The guiding-token name a decoder route is reached by: ``translate:de`` -> ``translate``."""
    return route.split(":", 1)[0]


def parse_route_list(value, what: str) -> Tuple[str, ...]:
    """Accept ``"wb,nb"`` or ``["wb", "nb"]``; reject empty or duplicated entries."""
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = [str(v).strip() for v in value]
    else:
        raise ValueError(f"{what} must be a list of route names or a comma-separated string, got {value!r}")
    if not items or any(not v for v in items):
        raise ValueError(f"{what} has an empty route name: {value!r}")
    if len(set(items)) != len(items):
        raise ValueError(f"{what} names a route twice: {value!r}")
    return tuple(items)


def parse_task_map(value, what: str = "smoe.tasks") -> Dict[str, str]:
    """``{task: guiding-token name}``, e.g. ``{asr: transcribe, st: translate, sum: summarize}``."""
    if not isinstance(value, Mapping) or not value:
        raise ValueError(f"{what} must be a non-empty mapping of manifest task to guiding-token name, got {value!r}")
    out = {}
    for task, token in value.items():
        if not isinstance(task, str) or not task.strip() or not isinstance(token, str) or not token.strip():
            raise ValueError(f"{what}: task and guiding-token names must be non-empty strings, got {task!r}: {token!r}")
        if any(c in token for c in "<>: \t"):
            raise ValueError(f"{what}: guiding-token name {token!r} (task {task!r}) must be bare, e.g. summarize "
                             f"(the dictionary symbol is <summarize>)")
        out[task.strip()] = token.strip()
    return out


class RoutingTable:
    """The route contract: which expert a row's metadata selects, and everything else derived from a row's task.

    The route lists' order is the expert order in the model. ``tasks`` maps each manifest ``task`` to the guiding
    token its targets start with (which also names its decoder route); ``asr_tasks`` are the tasks scored by WER (see
    :data:`DEFAULT_ASR_TASKS`). Everything else about routes (the guiding prefix, which rows are ASR, the batching
    key, the guiding symbols of a dictionary) is asked of this class, so that a new task, bandwidth or language is
    configuration and vocabulary only.
    """

    def __init__(
        self,
        encoder_routes: Sequence[str] = DEFAULT_ENCODER_ROUTES,
        decoder_routes: Sequence[str] = DEFAULT_DECODER_ROUTES,
        tasks: Optional[Mapping[str, str]] = None,
        asr_tasks: Optional[Sequence[str]] = None,
    ):
        self.encoder_routes = parse_route_list(encoder_routes, "encoder_routes")
        self.decoder_routes = parse_route_list(decoder_routes, "decoder_routes")
        self.tasks: Dict[str, str] = parse_task_map(TASK_TO_GUIDING_TOKEN if tasks is None else tasks)
        self.asr_tasks: Tuple[str, ...] = tuple(DEFAULT_ASR_TASKS if asr_tasks is None else asr_tasks)
        unknown = [t for t in self.asr_tasks if t not in self.tasks]
        if unknown:
            raise ValueError(f"smoe.asr_tasks names task(s) {unknown} that smoe.tasks does not map "
                             f"(tasks are {list(self.tasks)})")
        asr_tokens = {self.tasks[t] for t in self.asr_tasks}
        mixed = sorted({tok for t, tok in self.tasks.items() if t not in self.asr_tasks} & asr_tokens)
        if mixed:
            raise ValueError(f"smoe.tasks: guiding token(s) {mixed} serve both an ASR task and another task: which "
                             f"rows are ASR must follow from the decoder route")
        self._enc = {name: i for i, name in enumerate(self.encoder_routes)}
        self._dec = {name: i for i, name in enumerate(self.decoder_routes)}
        self._asr_routes = np.array([route_token(r) in asr_tokens for r in self.decoder_routes], dtype=bool)

    def __eq__(self, other):
        return (
            isinstance(other, RoutingTable)
            and self.encoder_routes == other.encoder_routes
            and self.decoder_routes == other.decoder_routes
            and self.tasks == other.tasks
            and self.asr_tasks == other.asr_tasks
        )

    def __repr__(self):
        extra = ""
        if self.tasks != TASK_TO_GUIDING_TOKEN or self.asr_tasks != DEFAULT_ASR_TASKS:
            extra = f", tasks={self.tasks}, asr_tasks={list(self.asr_tasks)}"
        return f"RoutingTable(encoder={list(self.encoder_routes)}, decoder={list(self.decoder_routes)}{extra})"

    @property
    def num_encoder_routes(self) -> int:
        return len(self.encoder_routes)

    @property
    def num_decoder_routes(self) -> int:
        return len(self.decoder_routes)

    # ------------------------------------------------------------------ routes by name
    def encoder_route_id(self, bandwidth: str) -> int:
        try:
            return self._enc[bandwidth]
        except KeyError:
            raise KeyError(
                f"bandwidth {bandwidth!r} has no encoder route; routes are {list(self.encoder_routes)}"
            ) from None

    def route_id(self, side: str, route: str) -> int:
        """The expert index of a route named exactly (``encoder``: ``wb``; ``decoder``: ``translate:de``)."""
        routes = {"encoder": self._enc, "decoder": self._dec}.get(side)
        if routes is None:
            raise ValueError(f"side must be 'encoder' or 'decoder', got {side!r}")
        if route not in routes:
            raise KeyError(f"{route!r} is not one of the {side} routes {list(routes)}")
        return routes[route]

    def decoder_route_name(self, task_token: str, tgt_lang: Optional[str]) -> str:
        """``translate`` + ``de`` -> ``translate:de`` if that route exists, else ``translate``."""
        if tgt_lang:
            specific = language_route(task_token, tgt_lang)
            if specific in self._dec:
                return specific
        if task_token in self._dec:
            return task_token
        raise KeyError(
            f"task token {task_token!r} (target language {tgt_lang!r}) has no decoder route; "
            f"routes are {list(self.decoder_routes)}"
        )

    def decoder_route_id(self, task_token: str, tgt_lang: Optional[str]) -> int:
        return self._dec[self.decoder_route_name(task_token, tgt_lang)]

    def task_tokens(self) -> List[str]:
        """The guiding-token names the decoder routes mention (``translate:de`` -> ``translate``)."""
        seen: List[str] = []
        for route in self.decoder_routes:
            name = route_token(route)
            if name not in seen:
                seen.append(name)
        return seen

    # ------------------------------------------------------------------ a row's task
    def task_token(self, task: str) -> str:
        """The guiding-token name of a manifest ``task`` (``asr`` -> ``transcribe``)."""
        try:
            return self.tasks[task]
        except KeyError:
            raise KeyError(f"unknown task {task!r}; expected one of {list(self.tasks)}") from None

    def is_asr_task(self, task: str) -> bool:
        return is_asr_task(task, self.asr_tasks)

    def decoder_route_of_task(self, task: str, tgt_lang: Optional[str]) -> int:
        return self.decoder_route_id(self.task_token(task), tgt_lang)

    def prefix_symbols(self, task: str, tgt_lang: str) -> List[str]:
        """The guiding prefix of a row, as dictionary symbols: ``<transcribe> <lang:en>`` (:data:`PREFIX_LEN` long)."""
        return [guiding_token(self.task_token(task)), lang_tag(tgt_lang)]

    def guiding_symbols(self) -> List[str]:
        """The task guiding tokens (``<transcribe>``, ...) of the tasks and the decoder routes, not the lang tags."""
        names = list(dict.fromkeys(list(self.tasks.values()) + self.task_tokens()))
        return [guiding_token(n) for n in names]

    def guiding_token_ids(self, dictionary) -> Set[int]:
        """Ids of every guiding symbol a fairseq dictionary holds: task tokens and ``<lang:xx>`` tags.

        Never generated after the forced prefix and stripped from hypotheses and references.
        """
        wanted = set(self.guiding_symbols())
        return {i for sym, i in dictionary.indices.items() if sym in wanted or is_lang_tag(sym)}

    # ------------------------------------------------------------------ per-row masks and keys from route ids
    def asr_decoder_routes(self) -> np.ndarray:
        """Per decoder route: do its rows belong to an ASR task (bool array, expert order)?"""
        return self._asr_routes.copy()

    def asr_rows(self, decoder_ids) -> np.ndarray:
        """Which rows are ASR rows (bool array), from their decoder route ids (host ids: no device transfer)."""
        return self._asr_routes[np.asarray(decoder_ids, dtype=np.int64)]

    def batch_keys(self, encoder_ids, decoder_ids) -> np.ndarray:
        """One integer per (encoder, decoder) route pair, ordered by pair: the homogeneous-batching key."""
        return (np.asarray(encoder_ids, dtype=np.int64) * self.num_decoder_routes
                + np.asarray(decoder_ids, dtype=np.int64))

    def to_args(self) -> Dict[str, str]:
        """Model-argument form, saved in every checkpoint so a mismatch is caught at load time."""
        return {
            "encoder_routes": ",".join(self.encoder_routes),
            "decoder_routes": ",".join(self.decoder_routes),
        }


def asr_rows_of(net_input: Mapping, table: RoutingTable) -> np.ndarray:
    """The per-row ASR mask of a batch, on the host: the collater's (``route_plan.asr``) or, for batches without a
    plan, derived from one host copy of ``decoder_route_ids``."""
    plan = net_input.get("route_plan")
    if isinstance(plan, RoutePlan) and plan.asr is not None:
        return plan.asr
    return table.asr_rows(net_input["decoder_route_ids"].cpu().numpy())


class RouteBatch:
    """Route ids of one batch plus the grouping every expert layer of a stack reuses.

    Computed once per forward pass of an encoder or decoder (not once per layer), on the host: from the collater's
    :class:`RoutePlan` (no device-to-host transfer at all) or, for callers that pass only the id tensor, from one
    host copy of it. Either the whole batch takes one route (``single``; the layers then call that expert
    directly, with no gather or scatter), or ``perm`` (rows sorted by route, stable), ``inverse`` and ``spans``
    (each used route with its start and end in ``perm``) let a mixed batch's FFN gather its rows once in ``fc1``
    and put them back once in ``fc2``. ``perm`` and ``inverse`` reach the device
    by non-blocking host-to-device copies, which queue behind the kernels in flight instead of waiting for them.
    """

    __slots__ = ("ids", "single", "perm", "inverse", "spans")

    def __init__(self, ids: torch.Tensor, host_ids: Union[None, torch.Tensor, np.ndarray] = None):
        if ids.dim() != 1:
            raise ValueError(f"route ids must be a 1-D tensor (one per sample), got shape {tuple(ids.shape)}")
        self.ids = ids
        if host_ids is None:
            host = ids.cpu().numpy()  # the one device-to-host copy of the fallback path; no-op for CPU tensors
        elif isinstance(host_ids, np.ndarray):
            host = host_ids
        else:
            host = host_ids.numpy()  # a CPU tensor
        host = host.astype(np.int64, copy=False)
        used = np.unique(host)
        self.perm = self.inverse = None
        self.spans: List[Tuple[int, int, int]] = []
        if used.size == 1:
            self.single: Optional[int] = int(used[0])
            return
        self.single = None
        order = np.argsort(host, kind="stable")
        counts = np.bincount(host) if host.size else np.zeros(0, dtype=np.int64)
        start = 0
        for r in used.tolist():
            self.spans.append((r, start, start + int(counts[r])))
            start += int(counts[r])
        self.perm = torch.as_tensor(order).to(ids.device, non_blocking=True)
        self.inverse = torch.as_tensor(np.argsort(order, kind="stable")).to(ids.device, non_blocking=True)

    @classmethod
    def of_single_route(cls, ids: torch.Tensor, route: int) -> "RouteBatch":
        """A batch already known to take one route (e.g. kept through beam-search reordering): no host copy."""
        batch = cls.__new__(cls)
        batch.ids, batch.single = ids, int(route)
        batch.perm = batch.inverse = None
        batch.spans = []
        return batch

    def used_routes(self) -> List[int]:
        """The routes this batch's rows take, in expert order (what a forward hook inspects)."""
        return [self.single] if self.single is not None else [r for r, _, _ in self.spans]


class RoutePlan:
    """The route ids of one collated batch, on the host: ``net_input["route_plan"]``.

    The collater knows every sample's routes as Python data, so it hands them to the model here, next to the id
    tensors: the model groups its rows from this copy and never reads route ids back from the device (on a GPU,
    each such read waits for every kernel queued before it). A plain class on purpose, not a tensor, list, dict,
    tuple or dataclass: fairseq's ``move_to_cuda``/``apply_to_sample`` and DDP's input moving copy those to the
    device and leave any other object where it is. Models that get no plan (benchmarks, tests, export) fall back
    to one host copy of the id tensors.
    """

    __slots__ = ("encoder", "decoder", "asr")

    def __init__(self, encoder_ids, decoder_ids, asr=None):
        # own copies: an array from ``tensor.numpy()`` shares the tensor's memory, which a data-loader worker frees
        # when it moves the batch's tensors to shared memory to send them (the plan would then read freed memory)
        self.encoder = np.array(encoder_ids, dtype=np.int64, copy=True)
        self.decoder = np.array(decoder_ids, dtype=np.int64, copy=True)
        if self.encoder.ndim != 1 or self.decoder.shape != self.encoder.shape:
            raise ValueError(
                f"a route plan needs one encoder and one decoder route per sample, got shapes "
                f"{self.encoder.shape} and {self.decoder.shape}"
            )
        # which rows are ASR rows (RoutingTable.asr_rows of the decoder ids): what the CTC loss, joint CTC decoding
        # and WER/BLEU scoring ask instead of task strings or tokens
        self.asr = None if asr is None else np.array(asr, dtype=bool, copy=True)
        if self.asr is not None and self.asr.shape != self.decoder.shape:
            raise ValueError(f"a route plan's ASR mask needs one entry per sample, got shape {self.asr.shape} for "
                             f"{self.decoder.shape[0]} samples")

    @property
    def batch_size(self) -> int:
        return int(self.encoder.shape[0])

    def ids(self, where: str) -> np.ndarray:
        if where not in ("encoder", "decoder"):
            raise ValueError(f"where must be 'encoder' or 'decoder', got {where!r}")
        return self.encoder if where == "encoder" else self.decoder

    def single(self, where: str) -> Optional[int]:
        """The route every row of the batch takes in the encoder/decoder, else None."""
        ids = self.ids(where)
        if ids.size == 0 or not (ids == ids[0]).all():
            return None
        return int(ids[0])

    def __getstate__(self):  # __slots__ without __dict__: pickled for data-loader workers
        return self.encoder, self.decoder, self.asr

    def __setstate__(self, state):
        self.encoder, self.decoder, self.asr = state

    def __repr__(self):
        return f"RoutePlan(encoder={self.encoder.tolist()}, decoder={self.decoder.tolist()})"


class RouteContext:
    """Holds the routes of the forward pass in flight for the expert layers of one encoder or decoder.

    fairseq's encoder and decoder loops call their layers without extra arguments; rather than copy those loops,
    the S-MoE encoder/decoder sets the routes here around the stock forward and the expert layers read them.
    """

    def __init__(self, num_routes: int, where: str):
        self.num_routes = num_routes
        self.where = where
        self.current: Optional[RouteBatch] = None

    @contextmanager
    def use(self, route_ids: Optional[torch.Tensor], batch_size: int, single: Optional[int] = None,
            host_ids: Optional[np.ndarray] = None):
        """Routes for one forward.

        ``single`` says the caller already knows every row takes that route; ``host_ids`` are the same ids on the
        host (from the collater's :class:`RoutePlan`). With either, nothing is read back from the device;
        without both, the ids are copied to the host once.
        """
        if route_ids is None:
            raise ValueError(
                f"the {self.where} has {self.num_routes} experts but the batch carries no {self.where} route ids; "
                f"use --task speech_to_text_smoe (its collater adds them to net_input)"
            )
        if route_ids.numel() != batch_size:
            raise ValueError(
                f"{self.where} route ids: {route_ids.numel()} for a batch of {batch_size} samples"
            )
        if single is not None:
            if not 0 <= single < self.num_routes:
                raise ValueError(f"{self.where} route id out of range [0, {self.num_routes}): {single}")
            batch = RouteBatch.of_single_route(route_ids, single)
        else:
            if host_ids is None:
                host = route_ids.cpu().numpy()  # the fallback's one device-to-host copy
            else:
                host = np.asarray(host_ids)
                if host.shape != (batch_size,):
                    raise ValueError(
                        f"{self.where} route plan: {host.size} route ids for a batch of {batch_size} samples"
                    )
            if host.size and (int(host.min()) < 0 or int(host.max()) >= self.num_routes):
                raise ValueError(
                    f"{self.where} route id out of range [0, {self.num_routes}): {host.tolist()}"
                )
            batch = RouteBatch(route_ids, host)
        with self.bound(batch):
            yield batch

    @contextmanager
    def bound(self, batch: "RouteBatch"):
        """Makes ``batch`` the current routes (restoring the previous ones after), e.g. for a recomputation."""
        previous = self.current
        self.current = batch
        try:
            yield batch
        finally:
            self.current = previous

    def get(self) -> RouteBatch:
        if self.current is None:
            raise RuntimeError(
                f"an S-MoE {self.where} layer ran outside its {self.where}'s forward, so it has no routes"
            )
        return self.current


def checkpoint_routed_layer(layer: torch.nn.Module, context: RouteContext, offload_to_cpu: bool = False):
    """fairseq's ``checkpoint_wrapper`` for a layer whose experts read ``context``.

    Activation checkpointing runs the layer's forward a second time inside ``backward()``, where no
    encoder/decoder forward has set the routes. Like ``checkpoint_wrapper`` itself, this patches the layer's
    ``forward`` (no wrapper module, so the state-dict keys stay those of the unwrapped layer): the outer forward
    passes the routes current at forward time into the checkpointed call as an argument, which the checkpoint
    keeps with its inputs, and the inner forward binds them again, in the original forward and in the
    recomputation alike, so both see the same :class:`RouteBatch`.
    """
    from fairseq.modules.checkpoint_activations import checkpoint_wrapper

    layer.forward = functools.partial(_forward_with_routes, layer.forward, context)
    layer = checkpoint_wrapper(layer, offload_to_cpu=offload_to_cpu)
    layer.forward = functools.partial(_forward_passing_routes, layer.forward, context)
    return layer


def _forward_passing_routes(checkpointed_forward, context: RouteContext, *args, **kwargs):
    return checkpointed_forward(*args, smoe_routes=context.get(), **kwargs)


def _forward_with_routes(forward, context: RouteContext, *args, smoe_routes: Optional[RouteBatch] = None, **kwargs):
    if smoe_routes is None:  # called directly (e.g. after fairseq's unwrap_checkpoint): the current routes
        return forward(*args, **kwargs)
    with context.bound(smoe_routes):
        return forward(*args, **kwargs)
