import numpy as np
import pytest
import torch

from fairseq_smoe.data.config import ConfigError, SMoEDataConfig
from fairseq_smoe.routing import RouteBatch, RouteContext, RoutePlan, RoutingTable


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
    assert single.single == 1 and single.spans == [] and single.perm is None
    mixed = RouteBatch(torch.tensor([1, 0, 1, 2]))
    assert mixed.single is None
    assert mixed.spans == [(0, 0, 1), (1, 1, 3), (2, 3, 4)]
    assert mixed.perm.tolist() == [1, 0, 2, 3] and mixed.inverse.tolist() == [1, 0, 2, 3]


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


def test_route_batch_from_host_ids_matches_the_tensor_path_and_copies_perm_to_the_ids_device():
    ids = torch.tensor([2, 0, 2, 1, 0])
    from_tensor = RouteBatch(ids)
    from_host = RouteBatch(ids, np.array([2, 0, 2, 1, 0]))
    assert from_host.spans == from_tensor.spans == [(0, 0, 2), (1, 2, 3), (2, 3, 5)]
    assert from_host.perm.tolist() == from_tensor.perm.tolist() == [1, 4, 3, 0, 2]
    assert from_host.inverse.tolist() == from_tensor.inverse.tolist()
    assert from_host.perm.dtype == torch.long and from_host.perm.device == ids.device
    assert RouteBatch(ids[:2] * 0, np.array([0, 0])).single == 0


def test_route_context_takes_host_ids_from_the_plan_and_checks_them():
    ctx = RouteContext(3, "decoder")
    ids = torch.tensor([0, 2, 2])
    with ctx.use(ids, 3, host_ids=np.array([0, 2, 2])) as r:
        assert r.spans == [(0, 0, 1), (2, 1, 3)] and ctx.get() is r
    with pytest.raises(ValueError, match=r"decoder route id out of range \[0, 3\): \[0, 3, 2\]"):
        with ctx.use(ids, 3, host_ids=np.array([0, 3, 2])):
            pass
    with pytest.raises(ValueError, match="decoder route plan: 2 route ids for a batch of 3 samples"):
        with ctx.use(ids, 3, host_ids=np.array([0, 2])):
            pass


def test_route_plan_holds_host_ids_and_knows_one_route_batches():
    plan = RoutePlan(torch.tensor([1, 1]).numpy(), [0, 1])
    assert plan.batch_size == 2 and plan.single("encoder") == 1 and plan.single("decoder") is None
    assert plan.encoder.dtype == np.int64 and not isinstance(plan, (list, tuple, dict, torch.Tensor))
    assert RoutePlan([], []).single("decoder") is None
    with pytest.raises(ValueError, match="where must be 'encoder' or 'decoder'"):
        plan.single("ctc")


def test_the_default_task_contract_reproduces_asr_and_st():
    from fairseq.data import Dictionary

    from fairseq_smoe.data.audio import bandwidth_from_rate
    from fairseq_smoe.routing import BANDWIDTHS, PREFIX_LEN, is_asr_task, is_lang_tag

    t = RoutingTable()
    assert BANDWIDTHS == ("wb", "nb") == t.encoder_routes  # one bandwidth order, routing's
    assert (bandwidth_from_rate(8000), bandwidth_from_rate(16000)) == ("nb", "wb")
    assert t.tasks == {"asr": "transcribe", "st": "translate"} and t.asr_tasks == ("asr",)
    assert t.prefix_symbols("asr", "en") == ["<transcribe>", "<lang:en>"]
    assert t.prefix_symbols("st", "es") == ["<translate>", "<lang:es>"] and PREFIX_LEN == 2
    assert t.decoder_route_of_task("st", "es") == 1 and t.is_asr_task("asr") and not t.is_asr_task("st")
    assert is_asr_task("asr") and not is_asr_task("st")
    assert is_lang_tag("<lang:es>") and not is_lang_tag("<lang:>") and not is_lang_tag("<translate>")
    with pytest.raises(KeyError, match=r"unknown task 'sum'; expected one of \['asr', 'st'\]"):
        t.task_token("sum")
    d = Dictionary()
    for sym in ["▁the", "<transcribe>", "<translate>", "<lang:en>", "<lang:es>", "<summarize>"]:
        d.add_symbol(sym)
    assert t.guiding_token_ids(d) == {d.index(s) for s in ["<transcribe>", "<translate>", "<lang:en>", "<lang:es>"]}


def test_which_rows_are_asr_and_the_batching_key_come_from_route_ids():
    t = RoutingTable(["wb", "nb"], ["transcribe", "translate", "translate:de", "summarize"],
                     tasks={"asr": "transcribe", "st": "translate", "sum": "summarize"})
    assert t.asr_decoder_routes().tolist() == [True, False, False, False]
    assert t.asr_rows([3, 0, 2, 0]).tolist() == [False, True, False, True]
    assert t.guiding_symbols() == ["<transcribe>", "<translate>", "<summarize>"]
    # one key per pair, ordered by (encoder, decoder), for any number of decoder routes
    big = RoutingTable(["wb", "nb"], [f"r{i}" for i in range(1001)], tasks={"asr": "r0"})
    keys = big.batch_keys([1, 0, 0, 1], [0, 1000, 0, 1000])
    assert len(set(keys.tolist())) == 4 and np.argsort(keys).tolist() == [2, 1, 0, 3]
    assert t.route_id("decoder", "translate:de") == 2
    with pytest.raises(KeyError, match=r"'sb' is not one of the encoder routes \['wb', 'nb'\]"):
        t.route_id("encoder", "sb")


def test_task_config_is_checked():
    cfg = SMoEDataConfig.from_dict({"decoder_routes": ["transcribe", "translate", "summarize"],
                                    "tasks": {"asr": "transcribe", "st": "translate", "sum": "summarize"},
                                    "asr_tasks": ["asr"]})
    assert cfg.routing_table.decoder_route_of_task("sum", "en") == 2
    with pytest.raises(ConfigError, match=r"smoe.asr_tasks names task\(s\) \['dict'\]"):
        SMoEDataConfig.from_dict({"asr_tasks": ["dict"]})
    with pytest.raises(ConfigError, match=r"guiding token\(s\) \['transcribe'\] serve both an ASR task and another"):
        SMoEDataConfig.from_dict({"tasks": {"asr": "transcribe", "dictation": "transcribe"}})
    with pytest.raises(ConfigError, match="must be bare, e.g. summarize"):
        SMoEDataConfig.from_dict({"tasks": {"sum": "<summarize>"}})
    with pytest.raises(ConfigError, match="smoe.tasks must be a non-empty mapping"):
        SMoEDataConfig.from_dict({"tasks": ["asr"]})


def test_route_plan_carries_the_asr_mask_through_pickling():
    import pickle

    plan = pickle.loads(pickle.dumps(RoutePlan([0, 1], [1, 0], [False, True])))
    assert plan.asr.tolist() == [False, True] and plan.decoder.tolist() == [1, 0]
    with pytest.raises(ValueError, match="ASR mask needs one entry per sample"):
        RoutePlan([0, 1], [1, 0], [True])
