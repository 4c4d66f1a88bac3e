"""The best constant hypothesis: the floor a model that ignores the audio reaches (fairseq_smoe.study.constant_baseline)."""

import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu

from fairseq_smoe.study import constant_baseline

TRAIN = ["this package contains the library", "this package contains documentation", "press one to accept"]


def test_candidates_are_targets_and_their_word_prefixes():
    cands = {" ".join(c) for c in constant_baseline.candidates(TRAIN + TRAIN)}
    assert cands == {"this", "this package", "this package contains", "this package contains the",
                     "this package contains the library", "this package contains documentation", "press",
                     "press one", "press one to", "press one to accept"}


def test_best_constant_wer_is_a_prefix_when_that_is_best():
    refs = ["this package contains fonts", "this package contains", "press one"]  # 4 + 3 + 2 = 9 words
    best = constant_baseline.best_constant(TRAIN, refs, "WER")
    # word errors counted by hand, per reference
    errors = {"this package contains": 1 + 0 + 3, "this package contains the": 1 + 1 + 4, "this package": 2 + 1 + 2,
              "this": 3 + 2 + 2, "press one": 4 + 3 + 0, "this package contains documentation": 1 + 1 + 4}
    assert best == {"hypothesis": "this package contains", "score": round(100 * 4 / 9, 2)}
    assert all(e > errors["this package contains"] for k, e in errors.items() if k != "this package contains")


def test_best_constant_bleu_matches_sacrebleu():
    refs = ["this package contains the library", "this package contains the library files"]
    best = constant_baseline.best_constant(TRAIN, refs, "BLEU")
    assert best["hypothesis"] == "this package contains the library"
    assert best["score"] == round(sacrebleu.corpus_bleu([best["hypothesis"]] * 2, [refs]).score, 2) > 50


def test_errors_name_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="no words"):
        constant_baseline.best_constant(TRAIN, ["", " "], "WER")
    with pytest.raises(ValueError, match="no training targets"):
        constant_baseline.best_constant([], ["a b"], "WER")
    header = "id\taudio\tn_frames\ttgt_text\tspeaker\ttask\tsrc_lang\ttgt_lang\tbandwidth\n"
    (tmp_path / "train.tsv").write_text(header + "u1\ta.wav\t10\thello there\ts\tasr\ten\ten\twb\n")
    (tmp_path / "test_x_es_st_wb.tsv").write_text(header + "u2\tb.wav\t10\thola\ts\tst\ten\tes\twb\n")
    train = constant_baseline.read_manifest(str(tmp_path / "train.tsv"))
    with pytest.raises(ValueError, match=r"train\.tsv: no training targets in language 'es'"):
        constant_baseline.for_test_set(tmp_path, "test_x_es_st_wb", train)
    (tmp_path / "test_y_asr_wb.tsv").write_text(header + "u3\tc.wav\t10\thello you\ts\tasr\ten\ten\twb\n")
    proc = subprocess.run([sys.executable, "-m", "fairseq_smoe.study.constant_baseline", "--data",
                           str(tmp_path), "test_y_asr_wb"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert '"hypothesis": "hello"' in proc.stdout and '"score": 50.0' in proc.stdout


def test_best_constant_cer_counts_characters_and_spaces():
    refs = ["press one", "press two"]  # 9 + 9 characters
    best = constant_baseline.best_constant(TRAIN, refs, "CER")
    # "press one": 0 + 3 ("one" -> "two": o->t, n->w, e->o); "press": 4 + 4 (" one", " two" deleted)
    assert best == {"hypothesis": "press one", "score": round(100 * 3 / 18, 2)}


def test_cer_stats_and_ctc_greedy_path():
    from fairseq_smoe.scoring.evaluation import cer_stats
    import torch
    from fairseq_smoe.study import ctc_greedy

    assert cer_stats(["Press, one!", ""], ["press one", "ab"]) == {"_cer_errors": 0 + 2, "_cer_chars": 9 + 2}
    # best path per frame: 2 2 0 3 3 0 0 2 -> collapse repeats -> 2 0 3 0 2 -> drop blank 0 -> 2 3 2; frames past
    # the length are ignored
    frames = [2, 2, 0, 3, 3, 0, 0, 2, 3, 3]
    lp = torch.full((len(frames), 4), -10.0)
    lp[torch.arange(len(frames)), torch.tensor(frames)] = 0.0
    assert ctc_greedy.greedy_ids(lp, 8, blank=0) == [2, 3, 2]
