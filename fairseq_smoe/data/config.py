"""The plugin's own options: the ``smoe:`` section of fairseq's S2T ``config.yaml``.

Example::

    smoe:
      encoder_routes: [wb, nb]              # expert order; paper: WB -> E0, NB -> E1
      decoder_routes: [transcribe, translate]
      tasks: {asr: transcribe, st: translate}   # manifest task -> guiding token (and decoder route); the default
      asr_tasks: [asr]                      # tasks scored by WER, trained with CTC; the others by BLEU (default)
      bandwidth_detection: rate             # rate | spectral (for rows whose manifest has no bandwidth)
      spectral_threshold_db: -50.0          # spectral: energy above 4 kHz below this -> nb
      homogeneous_batches: true             # one task and bandwidth per batch, batches interleaved

Unknown keys and wrong types are errors: a typo must not silently fall back to a default.
"""

from dataclasses import dataclass, field, fields
from typing import Any, Dict, Tuple

from ..routing import (
    DEFAULT_ASR_TASKS,
    DEFAULT_DECODER_ROUTES,
    DEFAULT_ENCODER_ROUTES,
    TASK_TO_GUIDING_TOKEN,
    RoutingTable,
    parse_route_list,
    parse_task_map,
)

BANDWIDTH_DETECTION = ("rate", "spectral")


class ConfigError(ValueError):
    pass


@dataclass
class SMoEDataConfig:
    encoder_routes: Tuple[str, ...] = DEFAULT_ENCODER_ROUTES
    decoder_routes: Tuple[str, ...] = DEFAULT_DECODER_ROUTES
    tasks: Dict[str, str] = field(default_factory=lambda: dict(TASK_TO_GUIDING_TOKEN))
    asr_tasks: Tuple[str, ...] = DEFAULT_ASR_TASKS
    bandwidth_detection: str = "rate"
    spectral_threshold_db: float = -50.0
    homogeneous_batches: bool = True

    @classmethod
    def from_dict(cls, raw: Any, where: str = "config.yaml") -> "SMoEDataConfig":
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: 'smoe' must be a mapping, got {type(raw).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) under 'smoe': {unknown}; known keys: {sorted(known)}")
        values: Dict[str, Any] = {}
        for key in ("encoder_routes", "decoder_routes"):
            if key in raw:
                try:
                    values[key] = parse_route_list(raw[key], f"smoe.{key}")
                except ValueError as e:
                    raise ConfigError(f"{where}: {e}") from None
        if "tasks" in raw:
            try:
                values["tasks"] = parse_task_map(raw["tasks"])
            except ValueError as e:
                raise ConfigError(f"{where}: {e}") from None
        if "asr_tasks" in raw:
            v = raw["asr_tasks"]
            if isinstance(v, str):
                v = [v]
            if not isinstance(v, (list, tuple)) or not all(isinstance(t, str) and t for t in v):
                raise ConfigError(f"{where}: smoe.asr_tasks must be a list of task names, got {v!r}")
            values["asr_tasks"] = tuple(v)
        if "bandwidth_detection" in raw:
            v = raw["bandwidth_detection"]
            if v not in BANDWIDTH_DETECTION:
                raise ConfigError(f"{where}: smoe.bandwidth_detection must be one of {BANDWIDTH_DETECTION}, got {v!r}")
            values["bandwidth_detection"] = v
        if "spectral_threshold_db" in raw:
            v = raw["spectral_threshold_db"]
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"{where}: smoe.spectral_threshold_db must be a number, got {v!r}")
            values["spectral_threshold_db"] = float(v)
        if "homogeneous_batches" in raw:
            v = raw["homogeneous_batches"]
            if not isinstance(v, bool):
                raise ConfigError(f"{where}: smoe.homogeneous_batches must be true or false, got {v!r}")
            values["homogeneous_batches"] = v
        cfg = cls(**values)
        try:
            cfg.routing_table  # the route lists, tasks and ASR tasks checked together
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        return cfg

    @property
    def routing_table(self) -> RoutingTable:
        return RoutingTable(self.encoder_routes, self.decoder_routes, self.tasks, self.asr_tasks)
