"""Parameter counts of the paper-size models with a 40,000-entry dictionary (the paper's numbers, to 0.01 M)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fairseq_smoe.cli import params

PAPER = {  # arch: (total M, active M for every route pair)
    "s2t_smoe_base": (107.05, 107.05),
    "s2t_dec_ffnx2": (119.65, 119.64),  # 12 x 512 fewer bias weights than DecS-MoE: 119.643 M
    "s2t_dec_smoe": (119.65, 107.05),
    "s2t_encdec_smoe": (144.84, 107.05),
}


@pytest.mark.parametrize("arch", sorted(PAPER))
def test_paper_sizes(arch):
    result = params.count(params.build(arch, 40000))
    total_m, active_m = PAPER[arch]
    assert abs(result["total"] / 1e6 - total_m) < 0.01
    for route, n in result["active"].items():
        assert abs(n / 1e6 - active_m) < 0.01, route


def test_exact_counts_and_route_pairs():
    base = params.count(params.build("s2t_smoe_base", 40000))
    encdec = params.count(params.build("s2t_encdec_smoe", 40000))
    assert base["total"] == 107_047_936
    assert encdec["total"] == 144_842_752
    # every S-MoE route pair runs exactly the dense model's parameter count
    assert set(encdec["active"]) == {"wb/transcribe", "wb/translate", "nb/transcribe", "nb/translate"}
    assert set(encdec["active"].values()) == {base["total"]}
    enc = params.count(params.build("s2t_enc_smoe", 40000))
    assert enc["total"] - base["total"] == 12 * 2_099_712  # one extra encoder FFN per layer


def test_three_routes_mean_three_experts():
    from fairseq_smoe.routing import RoutingTable

    table = RoutingTable(["wb", "nb", "swb"], ["transcribe", "translate"])
    two = params.count(params.build("s2t_enc_smoe", 40000))
    three = params.count(params.build("s2t_enc_smoe", 40000, table), table)
    assert three["total"] - two["total"] == 12 * 2_099_712
    assert len(three["active"]) == 3


def test_cli_prints_json():
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-m", "fairseq_smoe.cli.params", "--arch", "s2t_encdec_smoe", "--vocab-size", "40000"],
        cwd=root, capture_output=True, text=True, check=True,
    )
    result = json.loads(out.stdout)
    assert result["total_M"] == 144.84
    assert result["active_M"] == {k: 107.05 for k in result["active"]}
    bad = subprocess.run([sys.executable, "-m", "fairseq_smoe.cli.params", "--arch", "nope"], cwd=root,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown --arch 'nope'" in bad.stderr
