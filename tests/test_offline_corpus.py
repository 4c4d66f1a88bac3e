"""The offline corpus prep (fairseq_smoe.prep.offline) on a tiny fixture in the Debian packages' exact layout.

The fixture mirrors what apt installs: ``usr/share/asterisk/sounds/en_US_f_Allison/<name>.wav`` (8 kHz PCM) and
``<name>.g722`` (raw 64 kbit/s G.722 at 16 kHz) with sub-folders such as ``digits/``, the gzipped
``core-sounds-en.txt`` / ``core-sounds-es.txt`` transcript lists, and apt's ``Translation-xx`` files (deb822, here
plain, gzip and xz). Speech is made with flite. When the real packages are installed, they are checked too.
"""

import gzip
import hashlib
import json
import lzma
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fairseq_smoe import routing
from fairseq_smoe.data import audio
from fairseq_smoe.data.manifest import MANIFEST_COLUMNS
from fairseq_smoe.prep import common, offline, offline_sources, offline_text, offline_tts

REPO = Path(__file__).resolve().parents[1]

# name, English transcript, Spanish translation (None: not in core-sounds-es.txt)
PROMPTS = [
    ("activated", "Activated.", "Activado."),
    ("agent-loggedoff", "Agent Logged off.", "Agente desconectado"),
    ("agent-pass", "Please enter your password followed by the pound key.",
     "Por favor ingrese su contrasena seguida por la tecla de numero"),
    ("auth-thankyou", "Thank you.", "Gracias"),
    ("call-waiting", "Call waiting.", None),
    ("cancelled", "Cancelled.", "Cancelado."),
    ("conf-full", "That conference is full.", "La conferencia esta llena."),
    ("conf-getpin", "Please enter the conference pin number.", "Por favor ingrese el pin de la conferencia."),
    ("conf-invalid", "That is not a valid conference number.", "Ese no es un numero de conferencia valido."),
    ("conf-locked", "This conference is locked.", "Esta conferencia esta bloqueada."),
    ("dictate/pause", "pause", None),
    ("digits/7", "seven", "siete"),
    ("digits/2", "two", "dos"),
    ("invalid", "I am sorry, that's not a valid extension.", "Lo siento, esa no es una extension valida."),
    ("press-1", "Press 1 to accept.", "Presione 1 para aceptar."),
    ("transfer", "Please hold while I try that extension.", "Por favor espere mientras intento esa extension."),
    ("vm-goodbye", "Goodbye.", "Adios."),
    ("vm-password", "Password.", "Contrasena."),
    ("beep", "[this is a simple beep tone]", "[tono simple]"),            # not speech: dropped
    ("silence/1", "1 second of silence", None),                          # not speech: dropped
]
TRANSCRIPT_ONLY = ("queue-thankyou", "Thank you for your patience.")     # no recording: dropped

# (package, English description, Spanish, German); None = no translation in that language
DESCRIPTIONS = [
    ("wordcount", "simple tool to count words\n This tool counts the words in a text file. It prints the total at "
     "the end.\n .\n The program is small and fast.",
     "herramienta simple para contar palabras\n Esta herramienta cuenta las palabras de un archivo de texto. Muestra "
     "el total al final.\n .\n El programa es pequeño y rápido.",
     "einfaches Werkzeug zum Zählen von Wörtern\n Dieses Werkzeug zählt die Wörter in einer Textdatei. Es zeigt die "
     "Summe am Ende.\n .\n Das Programm ist klein und schnell."),
    ("chessgame", "chess game for the desktop\n You can play against the computer or against a friend. The board "
     "can be turned around.",
     "juego de ajedrez para el escritorio\n Puede jugar contra el ordenador o contra un amigo. El tablero se puede "
     "girar.", None),
    ("mailreader", "small program to read mail\n It shows new messages in a list. You can answer them with one "
     "key.\n .\n It also has a search function.",
     "pequeño programa para leer correo\n Muestra los mensajes nuevos en una lista. Puede contestarlos con una "
     "tecla.\n .\n También tiene una función de búsqueda.",
     "kleines Programm zum Lesen von E-Mails\n Es zeigt neue Nachrichten in einer Liste. Sie können sie mit einer "
     "Taste beantworten.\n .\n Es hat auch eine Suchfunktion."),
    ("paintbox", "drawing program for children\n Children can draw pictures with many colors. The pictures can be "
     "saved and printed.",
     None,
     "Malprogramm für Kinder\n Kinder können Bilder mit vielen Farben malen. Die Bilder können gespeichert und "
     "gedruckt werden."),
    ("weather", "shows the weather of your town\n It reads the forecast for the next days. The data comes from a "
     "public service.\n .\n Features:\n  * a small window\n  * a large map",
     "muestra el tiempo de su ciudad\n Lee la previsión para los próximos días. Los datos vienen de un servicio "
     "público.\n .\n Características:\n  * una ventana pequeña\n  * un mapa grande",
     "zeigt das Wetter Ihrer Stadt\n Es liest die Vorhersage für die nächsten Tage. Die Daten kommen von einem "
     "öffentlichen Dienst.\n .\n Funktionen:\n  * ein kleines Fenster\n  * eine große Karte"),
    ("notes", "keep short notes on your computer\n Notes are stored in a single file. They can be sorted by date.",
     "guarde notas cortas en su ordenador\n Las notas se guardan en un solo archivo. Se pueden ordenar por fecha.",
     "kurze Notizen auf dem Rechner speichern\n Notizen werden in einer einzigen Datei gespeichert. Sie können nach "
     "Datum sortiert werden."),
    ("libfoo2", "library for libfoo2 files\n This package contains the shared library libfoo2 version 2.1.",
     "biblioteca para archivos libfoo2\n Este paquete contiene la biblioteca compartida libfoo2 versión 2.1.",
     None),
    ("mismatch", "tool with two paragraphs\n First paragraph here.\n .\n Second paragraph here.",
     "herramienta con un solo párrafo\n Un párrafo que no tiene pareja en inglés.", None),
    ("musicbox", "play music from your collection\n The player keeps a list of your songs. It can play them in "
     "random order.",
     "reproduzca música de su colección\n El reproductor guarda una lista de sus canciones. Puede tocarlas en "
     "orden aleatorio.",
     "Musik aus Ihrer Sammlung abspielen\n Der Spieler führt eine Liste Ihrer Lieder. Er kann sie in zufälliger "
     "Reihenfolge abspielen."),
    ("clockface", "large clock for the screen\n The clock shows the time in big numbers. It can also show the date.",
     "reloj grande para la pantalla\n El reloj muestra la hora con números grandes. También puede mostrar la fecha.",
     "große Uhr für den Bildschirm\n Die Uhr zeigt die Zeit in großen Ziffern. Sie kann auch das Datum zeigen."),
]

VOICES = "flite-kal16,flite-slt,flite-awb,flite-rms"


def _flite(voice: str, text: str, path: Path) -> None:
    subprocess.run(["flite", "-voice", voice, "-t", text, "-o", str(path)], check=True, capture_output=True)


def _deb822(field: str, entries) -> str:
    out = []
    for pkg, desc in entries:
        md5 = hashlib.md5((DESC_EN[pkg] + "\n").encode()).hexdigest()
        out.append(f"Package: {pkg}\nDescription-md5: {md5}\n{field}: {desc}\n")
    return "\n".join(out)


DESC_EN = {pkg: en for pkg, en, _, _ in DESCRIPTIONS}


def build_fixture(root: Path) -> dict:
    """The Asterisk packages' files under ``root/usr/...`` and apt lists under ``root/lists``."""
    if not offline_tts.is_available(offline_tts.VOICES[0]):
        pytest.skip("flite is not installed (apt-get install flite)")
    pytest.importorskip("G722", reason="the G.722 codec package (pip install G722) builds the fixture")
    sounds = root / offline_sources.SOUNDS_DIR
    tmp = root / "tmp"
    tmp.mkdir(parents=True)
    for name, en, _ in PROMPTS:
        (sounds / name).parent.mkdir(parents=True, exist_ok=True)
        spoken = "silence" if name.startswith("silence/") else ("beep" if name == "beep" else en)
        _flite("kal", spoken, sounds / f"{name}.wav")  # flite's kal is an 8 kHz voice, like the en-wav package
        _flite("kal16", spoken, tmp / "wb.wav")
        wb, sr = sf.read(str(tmp / "wb.wav"), dtype="float32")
        assert sr == 16000
        (sounds / f"{name}.g722").write_bytes(offline_sources.encode_g722(wb))
    for path, lines in ((offline_sources.EN_TEXTS, [(n, en) for n, en, _ in PROMPTS] + [TRANSCRIPT_ONLY]),
                        (offline_sources.ES_TEXTS, [(n, es) for n, _, es in PROMPTS if es])):
        lang = "English" if "-en/" in path else "Spanish"
        text = f"; Core Asterisk Sounds in {lang}\n\n" + "".join(f"{n}: {t}\n" for n, t in lines)
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(root / path, "wt", encoding="utf-8") as f:
            f.write(text)
    lists = root / "lists"
    lists.mkdir()
    prefix = "deb.debian.org_debian_dists_bookworm_main_i18n_"
    (lists / f"{prefix}Translation-en").write_text(
        _deb822("Description-en", [(p, en) for p, en, _, _ in DESCRIPTIONS]), encoding="utf-8")
    with gzip.open(lists / f"{prefix}Translation-es.gz", "wt", encoding="utf-8") as f:
        f.write(_deb822("Description-es", [(p, es) for p, _, es, _ in DESCRIPTIONS if es]))
    with lzma.open(lists / f"{prefix}Translation-de.xz", "wt", encoding="utf-8") as f:
        f.write(_deb822("Description-de", [(p, de) for p, _, _, de in DESCRIPTIONS if de]))
    return {"root": root, "lists": lists}


def prep_args(fixture: dict, out: Path, *extra) -> list:
    return ["--out-dir", str(out), "--mode", "quick", "--langs", "es,de", "--root", str(fixture["root"]),
            "--translations", str(fixture["lists"]), "--lexicon", "", "--voices", VOICES, "--test-speakers", "rms",
            "--test-sentences", "4", "--dev-sentences", "2", "--real-test-fraction", "0.25", "--vocab-size", "150",
            "--digit-strings", "6", "--workers", "2", "--batch-size", "3", *extra]


def run_prep(args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "fairseq_smoe.prep.offline", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def read_tsv(path: Path) -> list:
    lines = path.read_text(encoding="utf-8").rstrip("\n").split("\n")
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:]]


def tree_digest(out: Path) -> dict:
    """sha1 of every manifest, audio file, vocabulary and config (what training reads)."""
    import sentencepiece as spm

    files = [p for p in out.rglob("*") if p.is_file() and (p.suffix in (".tsv", ".wav", ".yaml")
                                                            or p.name == "spm.txt")]
    digest = {str(p.relative_to(out)): hashlib.sha1(p.read_bytes()).hexdigest() for p in files}
    # spm.model also records the (temporary) path it was trained from: compare its pieces and scores
    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    digest["spm.model"] = [(sp.id_to_piece(i), round(sp.get_score(i), 4)) for i in range(sp.get_piece_size())]
    return digest


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    return build_fixture(tmp_path_factory.mktemp("debian_root"))


@pytest.fixture(scope="module")
def corpus(fixture, tmp_path_factory):
    out = tmp_path_factory.mktemp("offline") / "data"
    proc = run_prep(prep_args(fixture, out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


# ---- parsing ----------------------------------------------------------------------------------------------------

def test_prompt_texts_are_read_by_name_and_bad_lines_are_named(fixture, tmp_path):
    texts = offline_sources.read_prompt_texts(fixture["root"] / offline_sources.EN_TEXTS)
    assert texts["digits/7"] == "seven" and texts["agent-pass"].startswith("Please enter your password")
    assert len(texts) == len(PROMPTS) + 1
    bad = tmp_path / "core-sounds-en.txt.gz"
    with gzip.open(bad, "wt") as f:
        f.write("; header\n\nactivated: Activated.\nthis line has no colon\n")
    with pytest.raises(ValueError, match=r"core-sounds-en.txt.gz:4: not a 'name: text' line"):
        offline_sources.read_prompt_texts(bad)


def test_find_prompts_pairs_both_recordings_and_spanish_by_name(fixture):
    prompts = {p.name: p for p in offline_sources.find_prompts(fixture["root"])}
    # silence/ is not speech, queue-thankyou has no recording; everything else is found, sub-folders included
    assert set(prompts) == {n for n, _, _ in PROMPTS if not n.startswith("silence/")}
    assert prompts["digits/7"].es == "siete" and prompts["call-waiting"].es is None
    assert prompts["digits/7"].nb_path.name == "7.wav" and prompts["digits/7"].wb_path.suffix == ".g722"


def test_g722_decodes_to_16khz_wideband_matching_the_8khz_recording(fixture, tmp_path):
    p = next(p for p in offline_sources.find_prompts(fixture["root"]) if p.name == "agent-pass")
    wb = offline_sources.decode_g722(p.wb_path)
    nb, sr = sf.read(str(p.nb_path), dtype="float32")
    assert sr == 8000
    assert len(wb) == 2 * p.wb_path.stat().st_size  # 64 kbit/s: one byte per two 16 kHz samples
    assert abs(len(wb) / 16000 - len(nb) / 8000) < 0.15
    assert audio.high_band_energy_db(wb, 16000) > -40  # real energy above 4 kHz: wideband
    # the codec round trip keeps the waveform: the decoded audio matches flite's 16 kHz source up to G.722's delay
    _flite("kal16", "Please enter your password followed by the pound key.", tmp_path / "src.wav")
    src, _ = sf.read(str(tmp_path / "src.wav"), dtype="float32")
    n = min(len(src), len(wb)) - 40
    best = max(np.corrcoef(src[:n], wb[lag: lag + n])[0, 1] for lag in range(0, 40))
    assert best > 0.9


def test_translation_files_in_every_compression_and_sentence_alignment(fixture):
    es = offline_text.read_translations(next(fixture["lists"].glob("*Translation-es.gz")), "es")
    de = offline_text.read_translations(next(fixture["lists"].glob("*Translation-de.xz")), "de")
    assert len(es) == sum(1 for d in DESCRIPTIONS if d[2]) and len(de) == sum(1 for d in DESCRIPTIONS if d[3])
    pairs = offline_text.aligned_pairs(fixture["lists"], ["es", "de"])
    en_es = {p.en: p.tgt for p in pairs["es"]}
    assert en_es["It prints the total at the end."] == "Muestra el total al final."
    assert en_es["The program is small and fast."] == "El programa es pequeño y rápido."
    assert {p.en: p.tgt for p in pairs["de"]}["The clock shows the time in big numbers."] == \
        "Die Uhr zeigt die Zeit in großen Ziffern."
    # digits / package names are not speakable; paragraph structures that differ are not aligned; list items dropped
    assert not any("libfoo2" in p.en or "paragraph" in p.en or "window" in p.en for p in pairs["es"])
    assert "chess game for the desktop" in en_es and len(pairs["de"]) > 10


def test_translation_errors_name_the_file(tmp_path):
    bad = tmp_path / "x_Translation-es"
    bad.write_text("Package: a\nDescription-md5: 1\nno colon here\n")
    with pytest.raises(ValueError, match=r"x_Translation-es:3: not a 'Field: value' line"):
        offline_text.read_translations(bad, "es")
    empty = tmp_path / "y_Translation-de"
    empty.write_text("Package: a\nDescription-md5: 1\nDescription-es: hola\n")
    with pytest.raises(ValueError, match="no Description-de entries"):
        offline_text.read_translations(empty, "de")
    with pytest.raises(FileNotFoundError, match="no Translation-en file"):
        offline_text.aligned_pairs(tmp_path / "nothing", ["es"])


def test_speakable_filter_and_lexicon():
    assert offline_text.is_speakable("The program is small and fast.", "en")
    assert not offline_text.is_speakable("It uses GTK for its interface.", "en")       # acronym
    assert not offline_text.is_speakable("Supports mp3 and ogg files.", "en")         # digit
    assert not offline_text.is_speakable("See the manual.", "en", min_words=4)        # too short
    lex = frozenset("the program is small and fast it runs".split())
    assert offline_text.is_speakable("The program is small and fast.", "en", lexicon=lex)
    assert not offline_text.is_speakable("The program is small and mlterm.", "en", lexicon=lex)
    assert offline_text.is_speakable("Dieses Paket enthält die Bibliothek.", "de")    # German nouns are capitalised


@pytest.mark.parametrize("text,lang,expected", [
    ("Press 1 to mute, 2 to lock.", "en", "press one to mute two to lock"),
    ("Please enter your agent number followed by the pound key.", "en",
     "please enter your agent number followed by the pound key"),
    ("I'm sorry, 42 users.", "en", "i'm sorry forty two users"),
    ("Presione 1 para aceptar.", "es", "presione uno para aceptar"),
    ("Die Uhr zeigt 3 Ziffern.", "de", "die uhr zeigt drei ziffern"),
    ("[this is a simple beep tone]", "en", None),
    ("press * to toggle pause", "en", None),
    ("dial 1234 now", "en", None),
    ("H.323 and 3D", "en", None),
    ("Presione 25 para salir", "es", None),
])
def test_normalize_target(text, lang, expected):
    assert offline_text.normalize_target(text, lang) == expected


# ---- the corpus ---------------------------------------------------------------------------------------------------

def test_prep_writes_every_manifest_config_and_vocab(corpus):
    out, proc = corpus
    names = {p.stem for p in out.glob("*.tsv")}
    assert names == {"train", "dev", "test_real_asr_nb", "test_real_asr_wb", "test_real_es_st_nb",
                     "test_real_es_st_wb", "test_synth_asr_nb", "test_synth_asr_wb", "test_synth_es_st_nb",
                     "test_synth_es_st_wb", "test_synth_de_st_nb", "test_synth_de_st_wb"} | {
        f"test_digits_{src}_{t}_{bw}" for src in ("real", "synth") for t in ("asr", "es_st", "de_st")
        for bw in ("nb", "wb")}
    for name in names:
        rows = read_tsv(out / f"{name}.tsv")
        assert rows, name
        assert list(rows[0]) == ["id", "audio", "n_frames", "tgt_text", "speaker", "task", "src_lang", "tgt_lang",
                                 "bandwidth"]
        if name.startswith("test_"):
            _, _, task, bw = name.rsplit("_", 3)
            assert {(r["task"], r["bandwidth"]) for r in rows} == {(task, bw)}
    spm = (out / "spm.txt").read_text(encoding="utf-8").split("\n")
    for tok in ("<transcribe>", "<translate>", "<lang:en>", "<lang:es>", "<lang:de>"):
        assert f"{tok} 1" in spm
    # the project's own manifest validator accepts every split (it decodes every audio file)
    v = subprocess.run([sys.executable, "-m", "fairseq_smoe.cli.validate", "--check-audio",
                        *[str(out / f"{n}.tsv") for n in sorted(names)]], capture_output=True, text=True, cwd=str(REPO))
    assert v.returncode == 0, f"{v.stdout[-2000:]}{v.stderr[-2000:]}"
    assert "audio batches" in proc.stderr  # progress is logged


def test_digit_strings_real_ones_spliced_from_held_out_recordings(corpus, fixture):
    out, _ = corpus
    sounds = fixture["root"] / offline_sources.SOUNDS_DIR
    train = read_tsv(out / "train.tsv") + read_tsv(out / "dev.tsv")
    words = {"seven": "7", "two": "2"}  # the fixture's Asterisk digit recordings
    real = read_tsv(out / "test_digits_real_asr_nb.tsv")
    assert len(real) == 4 and all(r["speaker"] == "allison" for r in real)
    for r in real:
        digits = r["tgt_text"].split()
        assert 3 <= len(digits) <= 7 and set(digits) <= set(words)
        # the clip is the digits' recordings, 80 ms apart
        parts = [sf.info(str(sounds / f"digits/{words[d]}.wav")).frames for d in digits]
        assert sf.info(str(out / r["audio"])).frames == sum(parts) + int(0.08 * 8000) * (len(digits) - 1)
    es = {r["id"].rsplit("_", 2)[0]: r["tgt_text"] for r in read_tsv(out / "test_digits_real_es_st_nb.tsv")}
    assert {es[r["id"].rsplit("_", 2)[0]] for r in real} == {
        " ".join({"seven": "siete", "two": "dos"}[d] for d in r["tgt_text"].split()) for r in real}
    # neither a spliced recording nor a test string is trained on
    assert not any(r["id"].startswith("real_digits-") for r in train)
    test_keys = {r["tgt_text"] for name in ("test_digits_real_asr_nb", "test_digits_synth_asr_wb")
                 for r in read_tsv(out / f"{name}.tsv")}
    train_digit_rows = [r for r in train if r["task"] == "asr" and set(r["tgt_text"].split()) <= set(
        "zero one two three four five six seven eight nine".split())]
    assert len({r["tgt_text"] for r in train_digit_rows}) >= 6
    assert not test_keys & {r["tgt_text"] for r in train_digit_rows}
    assert {r["speaker"] for r in read_tsv(out / "test_digits_synth_asr_wb.tsv")} == {"rms"}


def test_study_mode_grows_only_the_digit_test_sets(fixture, tmp_path):
    """--test-digit-strings (the study mode's 300) sizes the synthetic and spliced digit test sets alone; left unset,
    the plan and the recorded settings are those of before (a quick corpus built earlier is not refused)."""
    def plan(*extra):
        args = offline.parse_args(prep_args(fixture, tmp_path / "d", *extra))
        return offline.plan_corpus(args), offline.settings_of(args)

    def count(clips, **kw):
        return sum(all(getattr(c, k) == v for k, v in kw.items()) for c in clips)

    quick, quick_settings = plan()
    same, _ = plan("--test-digit-strings", "4")  # = --test-sentences: the same draws
    grown, grown_settings = plan("--test-digit-strings", "9")
    assert [c.id for c in same] == [c.id for c in quick] and "test_digit_strings" not in quick_settings
    assert grown_settings["test_digit_strings"] == 9
    for clips, n in ((quick, 4), (grown, 9)):
        assert count(clips, split="test", group="digits", source="synth") == n
        assert count(clips, split="test", group="digits", source="real") == n
    sentences = dict(split="test", group="", source="synth")
    assert count(grown, **sentences) == count(quick, **sentences)
    assert count(grown, split="train", group="digits") == count(quick, split="train", group="digits")
    assert offline.PRESETS["study"] == dict(offline.PRESETS["quick"], test_digit_strings=300)


def test_some_train_digit_strings_are_read_one_digit_at_a_time(corpus):
    out, _ = corpus
    clips = json.loads((out / "plan.json").read_text())["clips"]
    digits = [c for c in clips if c["group"] == "digits" and c["source"] == "synth"]
    sep = [c for c in digits if "_sep" in c["id"]]
    assert sep and len(sep) < len(digits)  # quick: about half of the train and dev strings
    for c in sep:
        assert c["split"] != "test" and c["id"].endswith("_sep")
        assert c["text"] == ". ".join(w.capitalize() for w in c["targets"]["en"].split()) + "."
    assert all(c["text"] == c["targets"]["en"] for c in digits if c not in sep)
    assert {c["split"] for c in digits if c not in sep} >= {"test"}


def test_audio_rates_frames_and_targets(corpus):
    out, _ = corpus
    for name in ("train", "dev", "test_real_asr_nb", "test_synth_es_st_wb"):
        for r in read_tsv(out / f"{name}.tsv"):
            info = sf.info(str(out / r["audio"]))
            assert info.samplerate == (8000 if r["bandwidth"] == "nb" else 16000), r["id"]
            assert int(r["n_frames"]) == audio.num_fbank_frames(round(info.frames * 16000 / info.samplerate))
            assert r["tgt_lang"] == ("en" if r["task"] == "asr" else r["id"].split("_st-")[1][:2])
            assert r["tgt_text"] == r["tgt_text"].lower() and not any(c in r["tgt_text"] for c in ".,;?!")
    assert all(r["speaker"] == "allison" for r in read_tsv(out / "test_real_asr_nb.tsv"))


def test_real_prompts_copy_the_package_audio(corpus, fixture):
    out, _ = corpus
    prompts = {p.name.replace("/", "-"): p for p in offline_sources.find_prompts(fixture["root"])}
    for r in read_tsv(out / "test_real_asr_nb.tsv") + read_tsv(out / "test_real_asr_wb.tsv"):
        p = prompts[r["id"][len("real_"):-len("_asr_nb")]]
        ours, _ = sf.read(str(out / r["audio"]), dtype="float32")
        if r["bandwidth"] == "nb":
            theirs, _ = sf.read(str(p.nb_path), dtype="float32")
        else:
            theirs = offline_sources.decode_g722(p.wb_path)
        assert np.abs(ours - theirs).max() < 1e-3
        assert r["tgt_text"] == offline_text.normalize_target(p.en, "en")


def test_splits_are_speaker_and_sentence_disjoint(corpus):
    out, _ = corpus
    train = read_tsv(out / "train.tsv") + read_tsv(out / "dev.tsv")
    tests = [r for p in out.glob("test_*.tsv") for r in read_tsv(p)]
    synth_test_speakers = {r["speaker"] for r in tests if not r["id"].startswith("real_")}
    assert synth_test_speakers == {"rms"}
    assert "rms" not in {r["speaker"] for r in train}
    en_train = {r["tgt_text"] for r in train if r["task"] == "asr"}
    en_test = {r["tgt_text"] for r in tests if r["task"] == "asr"}
    assert en_test and not (en_train & en_test)
    # a held-out prompt is in no training row, in either bandwidth
    real_test = {r["id"].rsplit("_asr_", 1)[0] for r in tests if r["id"].startswith("real_") and r["task"] == "asr"}
    assert real_test and not any(r["id"].startswith(tuple(x + "_" for x in real_test)) for r in train)
    # ST rows exist exactly where a translation does: call-waiting has no Spanish
    st_ids = {r["id"] for r in train + tests if r["task"] == "st"}
    assert not any(i.startswith("real_call-waiting_") for i in st_ids)
    assert {r["bandwidth"] for r in train if r["id"].startswith("real_")} == {"nb", "wb"}


def test_spectrum_check_nb_has_no_energy_above_4khz(corpus):
    out, _ = corpus
    import json

    report = json.loads((out / "spectrum.json").read_text())
    assert report["synth_nb"]["max_db"] < -50 and report["real_nb"]["max_db"] < -50
    assert report["synth_wb"]["median_db"] > -40 and report["real_wb"]["median_db"] > -40
    # independently of the report: measure every NB and WB clip of a test set
    for bw, check in (("nb", lambda db: db < -50), ("wb", lambda db: db > -45)):
        for r in read_tsv(out / f"test_synth_asr_{bw}.tsv"):
            wav, sr = audio.read_waveform(audio.AudioRef(str(out / r["audio"])))
            db = audio.high_band_energy_db(audio.resample(wav, sr), 16000)
            assert check(db), (r["id"], db)


def test_spectrum_report_rejects_an_nb_clip_with_high_band_energy():
    clip = offline.Clip(id="x", split="train", source="synth", speaker="s", en_key="k", text="t",
                        targets={"en": "t"}, bandwidths=["nb", "wb"])
    with pytest.raises(ValueError, match=r"1 NB clips have energy above 4 kHz .*\('x', -20.0\)"):
        offline.spectrum_report([clip], {"x": {"nb": (8000, -20.0), "wb": (16000, -20.0)}})


def test_rerun_skips_and_other_settings_are_refused(corpus, fixture):
    out, _ = corpus
    before = tree_digest(out)
    start = time.time()
    proc = run_prep(prep_args(fixture, out))
    assert proc.returncode == 0 and "nothing to do" in proc.stderr
    assert time.time() - start < 60
    assert tree_digest(out) == before
    proc = run_prep(prep_args(fixture, out, "--seed", "2"))
    assert proc.returncode != 0
    assert "was prepared with other settings {'seed': (1, 2)}" in proc.stderr


def test_interrupted_prep_resumes_to_identical_output(corpus, fixture, tmp_path):
    """Kill the prep while it writes audio: no manifest appears; the rerun finishes and matches a clean run."""
    clean, _ = corpus
    out = tmp_path / "data"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "fairseq_smoe.prep.offline", *prep_args(fixture, out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    total = len(list((clean / "wav").rglob("*.wav")))
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        made = len(list((out / "wav").rglob("*.wav"))) if (out / "wav").exists() else 0
        if made >= 6:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "prep finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    made = len(list((out / "wav").rglob("*.wav")))
    assert 6 <= made < total
    assert not list(out.glob("*.tsv")) and not (out / "prep.done.json").exists()
    rerun = run_prep(prep_args(fixture, out))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert tree_digest(out) == tree_digest(clean)
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_failure_names_the_file_and_rerun_completes(corpus, fixture, tmp_path):
    clean, _ = corpus
    broken_root = tmp_path / "root"
    subprocess.run(["cp", "-a", str(fixture["root"]), str(broken_root)], check=True)
    bad = broken_root / offline_sources.SOUNDS_DIR / "agent-pass.wav"
    bad.write_bytes(b"RIFF not really a wav file")
    fix = {"root": broken_root, "lists": fixture["lists"]}
    out = tmp_path / "data"
    proc = run_prep(prep_args(fix, out))
    assert proc.returncode != 0
    assert "agent-pass.wav: cannot decode audio" in proc.stderr
    assert not list(out.glob("*.tsv"))
    subprocess.run(["cp", str(fixture["root"] / offline_sources.SOUNDS_DIR / "agent-pass.wav"), str(bad)], check=True)
    proc = run_prep(prep_args(fix, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tree_digest(out) == tree_digest(clean)


# ---- one pipeline: the offline corpus's rows, vocabulary and config come from the recipes' writer ----------------

def test_the_offline_data_dir_is_what_the_recipes_writer_writes(corpus, tmp_path):
    """common.write_data_dir, given the corpus's rows and train texts, rewrites its manifests, vocabulary and
    config.yaml byte for byte: the offline corpus has no writer of its own."""
    out, _ = corpus
    sets = {p.stem: read_tsv(p) for p in sorted(out.glob("*.tsv"))}
    train_texts = sorted({r["tgt_text"] for r in sets["train"]})
    again = tmp_path / "again"
    common.write_data_dir(again, sets, train_texts, ["en", "es", "de"], 150, vocab_type="char", specaugment=False)
    assert sorted(p.name for p in again.iterdir()) == sorted(
        [f"{n}.tsv" for n in sets] + ["config.yaml", "spm.model", "spm.txt"])
    for name in [f"{n}.tsv" for n in sets] + ["config.yaml", "spm.txt"]:
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    import yaml

    assert yaml.safe_load((out / "config.yaml").read_text())["smoe"] == routing.smoe_config()


def test_clip_rows_tasks_ids_and_test_set_names():
    """English targets are transcripts (routing's ASR task), other languages translations; the row ids and test-set
    names keep the corpus's own form; every row holds the manifest columns."""
    clips = [
        offline.Clip(id="real_x", split="test", source="real", speaker="allison", en_key="k", text="T",
                     targets={"es": "hola", "en": "hello"}, bandwidths=["nb", "wb"]),
        offline.Clip(id="syn_v_1", split="train", source="synth", speaker="s", en_key="k2", text="T2",
                     targets={"en": "one two", "de": "eins zwei"}, bandwidths=["wb"], group="digits"),
        offline.Clip(id="syn_v_2", split="test", source="synth", speaker="s", en_key="k3", text="T3",
                     targets={"en": "three"}, bandwidths=["nb"], group="digits"),
    ]
    info = {"real_x": {"nb": (8000, -80.0), "wb": (16000, -20.0)}, "syn_v_1": {"wb": (32000, -20.0)},
            "syn_v_2": {"nb": (4000, -80.0)}}
    sets = offline.clip_rows(clips, info)
    assert sorted(sets) == ["test_digits_synth_asr_nb", "test_real_asr_nb", "test_real_asr_wb", "test_real_es_st_nb",
                            "test_real_es_st_wb", "train"]
    assert [r["id"] for r in sets["train"]] == ["syn_v_1_asr_wb", "syn_v_1_st-de_wb"]  # sorted by id
    es = sets["test_real_es_st_nb"][0]
    assert es == {"id": "real_x_st-es_nb", "audio": "wav/8k/real_x.wav", "n_frames": audio.num_fbank_frames(16000),
                  "tgt_text": "hola", "speaker": "allison", "task": routing.ST_TASK, "src_lang": "en",
                  "tgt_lang": "es", "bandwidth": "nb"}
    assert list(es) == MANIFEST_COLUMNS
    assert {r["task"] for rows in sets.values() for r in rows if r["tgt_lang"] == "en"} == {routing.ASR_TASK}
    assert sets["train"][0]["audio"] == "wav/16k/syn_v_1.wav" and sets["train"][0]["n_frames"] == 198


def test_manifest_row_and_a_kept_vocabulary_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"manifest row 'a': missing column\(s\) \['bandwidth'\], unknown "
                                         r"column\(s\) \['lang'\]"):
        common.manifest_row(id="a", audio="a.wav", n_frames=5, tgt_text="x", speaker="", task="asr", src_lang="en",
                            tgt_lang="en", lang="en")
    rows = {"train": [common.manifest_row(id="a_asr_wb", audio="a.wav", n_frames=5, tgt_text="ab ba", speaker="",
                                          task="asr", src_lang="en", tgt_lang="en", bandwidth="wb")]}
    common.write_data_dir(tmp_path, rows, ["ab ba", "abba"], ["en"], 50, vocab_type="char")
    # a rerun for another language keeps no vocabulary without its tag: the error names the file and the way out
    with pytest.raises(common.PrepError, match=r"spm.txt \(from an earlier run\) lacks \['<lang:fr>'\]; delete"):
        common.write_data_dir(tmp_path, rows, ["ab ba"], ["en", "fr"], 50, vocab_type="char")


def test_the_writer_writes_a_routing_tables_tasks_and_their_guiding_tokens(tmp_path):
    """A third decoder route by configuration: the writer's config.yaml reads back as the same table, and the
    vocabulary holds the new task's guiding token; the default table writes no tasks entry."""
    import yaml

    from fairseq_smoe.data.config import SMoEDataConfig

    table = routing.RoutingTable(routing.BANDWIDTHS, ("transcribe", "translate", "summarize"),
                                 tasks={"asr": "transcribe", "st": "translate", "sum": "summarize"})
    rows = {"train": [common.manifest_row(id="a_sum_wb", audio="a.wav", n_frames=5, tgt_text="ab", speaker="",
                                          task="sum", src_lang="en", tgt_lang="en", bandwidth="wb")]}
    common.write_data_dir(tmp_path / "sum", rows, ["ab ba", "abba"], ["en"], 50, vocab_type="char", routes=table)
    smoe = yaml.safe_load((tmp_path / "sum" / "config.yaml").read_text())["smoe"]
    assert smoe == {"encoder_routes": ["wb", "nb"], "decoder_routes": ["transcribe", "translate", "summarize"],
                    "tasks": {"asr": "transcribe", "st": "translate", "sum": "summarize"}}
    assert SMoEDataConfig.from_dict(smoe).routing_table == table
    symbols = [line.split(" ")[0] for line in (tmp_path / "sum" / "spm.txt").read_text().splitlines()]
    assert symbols[:4] == ["<transcribe>", "<translate>", "<summarize>", "<lang:en>"]
    common.write_data_dir(tmp_path / "default", rows, ["ab ba"], ["en"], 50, vocab_type="char",
                          routes=routing.RoutingTable())
    assert yaml.safe_load((tmp_path / "default" / "config.yaml").read_text())["smoe"] == routing.smoe_config()
    assert "<summarize> 1" not in (tmp_path / "default" / "spm.txt").read_text()


# ---- voices and the real packages (when installed) -------------------------------------------------------------

@pytest.mark.parametrize("voice", offline_tts.VOICES, ids=lambda v: v.name)
def test_every_installed_voice_speaks_16khz(voice):
    if not offline_tts.is_available(voice):
        pytest.skip(f"{voice.name} not installed ({voice.package})")
    wavs = offline_tts.synthesize(voice, ["this package contains the shared library", "thank you"])
    assert len(wavs) == 2
    assert 1.0 < len(wavs[0]) / 16000 < 6.0 and len(wavs[1]) < len(wavs[0])
    assert abs(float(np.abs(wavs[0]).max()) - 0.7) < 1e-3
    assert audio.high_band_energy_db(wavs[0], 16000) > -45


def test_unknown_or_missing_voice_is_an_error():
    with pytest.raises(ValueError, match="unknown voice"):
        offline_tts.available_voices(["flite-nobody"])


REAL_SOUNDS = Path("/") / offline_sources.SOUNDS_DIR


@pytest.mark.skipif(not (REAL_SOUNDS / "agent-pass.g722").exists()
                    or not Path("/", offline_sources.ES_TEXTS).exists(),
                    reason="Debian's asterisk-core-sounds-en-wav/-en-g722/-es are not installed")
def test_real_asterisk_packages():
    prompts = offline_sources.find_prompts(Path("/"))
    assert len(prompts) > 500 and sum(p.es is not None for p in prompts) > 400
    p = next(p for p in prompts if p.name == "agent-pass")
    wb = offline_sources.decode_g722(p.wb_path)
    nb, sr = sf.read(str(p.nb_path), dtype="float32")
    assert sr == 8000 and abs(len(wb) / 16000 - len(nb) / 8000) < 0.05
    assert audio.high_band_energy_db(wb, 16000) > -35
    assert audio.high_band_energy_db(audio.resample(nb, 8000), 16000) < -50
