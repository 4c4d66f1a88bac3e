"""Session fixtures: the flite speech corpus of :mod:`fixture_corpus`, built once per test session, and the task over it."""

import argparse
from pathlib import Path

import pytest

from fixture_corpus import have_flite, make_corpus


@pytest.fixture(scope="session")
def flite_cache(tmp_path_factory) -> Path:
    """flite output shared by every corpus a session builds."""
    if not have_flite():
        pytest.skip("flite is not installed; the speech-corpus tests need it (apt-get install flite)")
    return tmp_path_factory.mktemp("flite_cache")


@pytest.fixture(scope="session")
def flite_corpus(tmp_path_factory, flite_cache) -> dict:
    """:func:`fixture_corpus.make_corpus`'s result for the default corpus (manifests with a bandwidth column)."""
    return make_corpus(tmp_path_factory.mktemp("corpus"), cache_dir=flite_cache)


@pytest.fixture(scope="session")
def corpus_dir(flite_corpus) -> Path:
    return flite_corpus["root"]


@pytest.fixture(scope="session")
def flite_corpus_no_bandwidth(tmp_path_factory, flite_cache) -> dict:
    """The same corpus with manifests that leave the bandwidth to be derived from the audio."""
    root = tmp_path_factory.mktemp("corpus_no_bandwidth")
    return make_corpus(root, bandwidth_column=False, cache_dir=flite_cache)


def load_train_task(data_dir):
    """``speech_to_text_smoe`` set up on ``data_dir`` (default flags, seed 1) with its ``train`` split loaded."""
    from fairseq_smoe.tasks.speech_to_text_smoe import SpeechToTextSMoETask

    parser = argparse.ArgumentParser()
    SpeechToTextSMoETask.add_args(parser)
    args = parser.parse_args([str(data_dir)])
    args.seed = 1
    task = SpeechToTextSMoETask.setup_task(args)
    task.load_dataset("train")
    return task


@pytest.fixture(scope="module")
def train_task(corpus_dir):
    """The task over the session's flite corpus, ``train`` loaded (in-process batches from the real collater)."""
    return load_train_task(corpus_dir)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, flite_cache):
    """The hub tests' tiny trained model folder and its corpus (tests/hub_model.py), trained once per session."""
    from hub_model import trained_model

    return trained_model(tmp_path_factory, flite_cache)


@pytest.fixture(scope="session")
def hub(trained):
    """``fairseq_smoe.hub.from_pretrained`` on the shared tiny model (en -> es)."""
    from fairseq_smoe.hub import from_pretrained

    return from_pretrained(trained["model"], lang="en", tgt_lang="es")
