import pytest
import torch

from fairseq_smoe.config import ConfigError, SMoEDataConfig
from fairseq_smoe.routing import RouteBatch, RouteContext, RoutingTable


def test_default_table_follows_the_paper():
    t = RoutingTable()
    assert t.encoder_route_id("wb") == 0 and t.encoder_route_id("nb") == 1  # paper: WB -> E0, NB -> E1
    assert t.decoder_route_id("transcribe", "en") == 0
    assert t.decoder_route_id("translate", "es") == 1


def test_language_specific_decoder_routes_fall_back_to_the_task_route():
    t = RoutingTable(["wb", "nb", "swb"], ["transcribe", "translate", "translate:de"])
    assert t.num_encoder_routes == 3 and t.num_decoder_routes == 3
    assert t.decoder_route_id("translate", "de") == 2
    assert t.decoder_route_id("translate", "es") == 1
    assert t.task_tokens() == ["transcribe", "translate"]


def test_unknown_routes_name_the_value_and_the_known_routes():
    t = RoutingTable()
    with pytest.raises(KeyError, match="'sb'.*\\['wb', 'nb'\\]"):
        t.encoder_route_id("sb")
    with pytest.raises(KeyError, match="'summarize'"):
        t.decoder_route_id("summarize", "en")


@pytest.mark.parametrize("bad", ["", "wb,,nb", "wb,wb", 3])
def test_bad_route_lists_are_rejected(bad):
    with pytest.raises(ValueError):
        RoutingTable(bad, ["transcribe"])


def test_route_batch_groups_rows_once():
    single = RouteBatch(torch.tensor([1, 1, 1]))
    assert single.single == 1 and single.groups is None
    mixed = RouteBatch(torch.tensor([1, 0, 1, 2]))
    assert mixed.single is None
    assert [(r, rows.tolist()) for r, rows in mixed.groups] == [(0, [1]), (1, [0, 2]), (2, [3])]


def test_route_context_checks_ids_and_restores():
    ctx = RouteContext(2, "encoder")
    with pytest.raises(ValueError, match="no encoder route ids"):
        with ctx.use(None, 3):
            pass
    with pytest.raises(ValueError, match="2 for a batch of 3"):
        with ctx.use(torch.tensor([0, 1]), 3):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with ctx.use(torch.tensor([0, 2, 1]), 3):
            pass
    with ctx.use(torch.tensor([0, 1, 1]), 3) as r:
        assert ctx.get() is r
    with pytest.raises(RuntimeError, match="outside"):
        ctx.get()


def test_config_section_is_strict():
    cfg = SMoEDataConfig.from_dict({"encoder_routes": "nb,wb", "homogeneous_batches": False})
    assert cfg.routing_table.encoder_route_id("nb") == 0 and cfg.homogeneous_batches is False
    assert SMoEDataConfig.from_dict(None) == SMoEDataConfig()
    with pytest.raises(ConfigError, match="unknown key.*'encoder_route'"):
        SMoEDataConfig.from_dict({"encoder_route": ["wb", "nb"]})
    with pytest.raises(ConfigError, match="homogeneous_batches must be true or false"):
        SMoEDataConfig.from_dict({"homogeneous_batches": "yes"})
    with pytest.raises(ConfigError, match="bandwidth_detection"):
        SMoEDataConfig.from_dict({"bandwidth_detection": "energy"})
    with pytest.raises(ConfigError, match="spectral_threshold_db must be a number"):
        SMoEDataConfig.from_dict({"spectral_threshold_db": "-30"})
