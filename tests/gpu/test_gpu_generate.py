"""fairseq-generate in each precision (fp32, ``--fp16``, ``--amp --amp-dtype bfloat16``), with beam search and with
joint CTC/attention beam search (``--ctc-decode-weight 0.3``), on an ASR and an ST test set: every utterance gets a
hypothesis, the score line is printed, and no guiding token reaches the output.

The decodings are independent, so on a GPU they run at once (the _xs model leaves it mostly idle)."""

import concurrent.futures
import re

import pytest

from gpu_helpers import NO_BF16, generate_cmd, hypotheses, native_bf16, rows, run, threads

GUIDING = re.compile(r"<transcribe>|<translate>|<lang:")
DECODE_PRECISIONS = ("fp32", "fp16", "bf16")
# (test set, decoding): joint CTC decoding rescores ASR rows only
CASES = [(p, "test_asr_wb", "beam") for p in DECODE_PRECISIONS] + \
        [(p, "test_asr_nb", "joint") for p in DECODE_PRECISIONS] + \
        [(p, "test_st_nb", "beam") for p in DECODE_PRECISIONS]


@pytest.fixture(scope="module")
def decodings(device, gpu_corpus, checkpoint, tmp_path_factory):
    work = tmp_path_factory.mktemp("generate")

    def one(case):
        precision, subset, decoding = case
        extra = ["--ctc-decode-weight", "0.3"] if decoding == "joint" else []
        cmd = generate_cmd(device, gpu_corpus, checkpoint, subset, precision, *extra)
        return case, run(cmd, cwd=work, n_threads=threads(device), check=False)

    cases = [c for c in CASES if c[0] != "bf16" or native_bf16(device)]
    with concurrent.futures.ThreadPoolExecutor(len(cases) if device == "cuda" else 1) as pool:
        return dict(pool.map(one, cases))


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_generate_decodes_every_utterance(decodings, gpu_corpus, case, device):
    precision, subset, decoding = case
    if precision == "bf16" and not native_bf16(device):
        pytest.skip(NO_BF16)
    rc, log = decodings[case]
    assert rc == 0, log[-6000:]
    if "_asr_" in subset:
        assert re.search(rf"Generate {subset} with beam=3: WER: [\d.]+", log), log[-3000:]
    else:
        assert re.search(rf"Generate {subset} with beam=3: BLEU = [\d.]+", log), log[-3000:]
    if precision == "bf16":  # autocast reached the model on this device (the task logs it once)
        assert f"--amp --amp-dtype bfloat16: decoding: decoder logits computed in torch.bfloat16 on {device}" in log
    hyps = hypotheses(log)
    assert sorted(hyps) == list(range(rows(gpu_corpus, subset))), log[-3000:]
    assert not any(GUIDING.search(line) for line in log.splitlines() if line[:2] in ("H-", "D-"))
    # the hypothesis scores are finite numbers in every precision (no nan / -inf from an overflow)
    scores = [float(s) for s in re.findall(r"^H-\d+\t(\S+)\t", log, re.M)]
    assert len(scores) == len(hyps) and all(s == s and abs(s) != float("inf") for s in scores), scores


def test_precisions_agree_on_most_hypotheses(decodings, device):
    """Half precision changes rounding, not the model: most hypotheses equal fp32's (the same beam search)."""
    for subset, decoding in (("test_asr_wb", "beam"), ("test_asr_nb", "joint")):
        logs = {p: decodings[(p, subset, decoding)] for p in DECODE_PRECISIONS if (p, subset, decoding) in decodings}
        assert all(rc == 0 for rc, _ in logs.values())
        ref = hypotheses(logs["fp32"][1])
        for p in [p for p in ("fp16", "bf16") if p in logs]:
            same = sum(hypotheses(logs[p][1])[i] == h for i, h in ref.items())
            assert same >= len(ref) // 2, f"{subset} {decoding}: {p} agrees with fp32 on {same} of {len(ref)}"
