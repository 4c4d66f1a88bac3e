"""Transcribe or translate audio files with a trained model: ``python -m fairseq_smoe.cli.transcribe MODEL_DIR INPUT...``

INPUT is an audio file, a folder (searched recursively for the extensions soundfile reads) or, with ``--list``, a
text file of paths (one a line, relative to the list's folder; ``id<TAB>path`` lines give the id). One output line
per file, TSV (``id path bandwidth task language text segments``) or JSON lines, written and flushed one at a time.
Rerunning with the same ``--output`` resumes: ids already there are skipped and a torn last line (an interrupted
write) is cut off first. A file that cannot be read or decoded is reported on stderr with its path and the reason,
and the rest go on; such files are not written, so a rerun tries them again.

Exit status: 0 every file decoded, 1 some failed (the count is printed), 2 usage error (bad arguments, no inputs,
duplicate ids, an output file of another format).
"""

import argparse
import csv
import io
import json
import logging
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

TSV_COLUMNS = ("id", "path", "bandwidth", "task", "language", "text", "segments")
FORMATS = ("tsv", "jsonl")


class UsageError(ValueError):
    pass


def audio_extensions() -> Set[str]:
    """The file extensions libsndfile (through soundfile) reads on this machine, e.g. .wav .flac .ogg .mp3."""
    import soundfile as sf

    exts = {f".{name.lower()}" for name in sf.available_formats()}
    return exts | {".wav", ".flac", ".ogg", ".aiff", ".aif"}


def collect_inputs(inputs: List[str], lists: List[str]) -> List[Tuple[str, str]]:
    """``(id, path)`` pairs in a stable order: files as given, folders sorted, list files in their line order.

    The id of a file in a folder is its path under that folder without the extension; of a file given directly,
    its name without the extension; of a list line, its ``id`` column or, without one, as for a file.
    """
    exts = audio_extensions()
    pairs: List[Tuple[str, str]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in exts)
            pairs += [(str(f.relative_to(p).with_suffix("")), str(f)) for f in found]
        elif p.exists():
            pairs.append((p.stem, str(p)))
        else:  # reported as a failed file, like one that cannot be read
            pairs.append((p.stem, str(p)))
    for list_file in lists:
        lp = Path(list_file)
        if not lp.is_file():
            raise UsageError(f"--list {list_file}: file not found")
        for n, line in enumerate(lp.read_text(encoding="utf-8").splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split("\t")
            if len(fields) > 2:
                raise UsageError(f"{list_file}:{n}: expected 'path' or 'id<TAB>path', got {len(fields)} fields")
            uid, path = (fields[0], fields[1]) if len(fields) == 2 else (None, fields[0])
            path = path if os.path.isabs(path) else str(lp.parent / path)
            pairs.append((uid or Path(path).stem, path))
    seen: Dict[str, str] = {}
    for uid, path in pairs:
        if uid in seen and seen[uid] != path:
            raise UsageError(f"id {uid!r} names two files: {seen[uid]} and {path} (give them ids in a --list file)")
        seen[uid] = path
    out, done = [], set()
    for uid, path in pairs:  # the same file given twice is decoded once
        if uid not in done:
            done.add(uid)
            out.append((uid, path))
    return out


def read_done_ids(path: str, fmt: str) -> Set[str]:
    """Ids already in an output file; cuts a torn last line (no newline) off first. Writes a TSV header if new."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return set()
    with open(path, "rb+") as f:
        data = f.read()
        if not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            print(f"{path}: cut off a torn last line ({len(data) - keep} bytes) left by an interrupted run",
                  file=sys.stderr)
            f.truncate(keep)
            data = data[:keep]
    text = data.decode("utf-8")
    ids: Set[str] = set()
    if fmt == "tsv":
        lines = text.splitlines()
        if lines and lines[0].split("\t") != list(TSV_COLUMNS):
            raise UsageError(f"{path}: not a TSV written by this command (header {lines[0]!r}); "
                             f"use another --output or --format")
        for row in csv.reader(io.StringIO("\n".join(lines[1:])), delimiter="\t", quoting=csv.QUOTE_NONE):
            if row:
                ids.add(row[0])
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            try:
                ids.add(json.loads(line)["id"])
            except (ValueError, KeyError, TypeError):
                raise UsageError(f"{path}:{n}: not a JSON line with an 'id' written by this command; "
                                 f"use another --output or --format") from None
    return ids


def _clean(text: str) -> str:
    return text.replace("\t", " ").replace("\n", " ").replace("\r", " ")


def format_row(fmt: str, uid: str, path: str, result) -> str:
    segments = None if result.segments is None else [s.to_dict() for s in result.segments]
    if fmt == "jsonl":
        return json.dumps({"id": uid, "path": path, "bandwidth": result.bandwidth, "task": result.task,
                           "language": result.lang, "text": result.text, "segments": segments},
                          ensure_ascii=False) + "\n"
    seg_field = "" if segments is None else json.dumps(segments, ensure_ascii=False)
    return "\t".join(_clean(v) for v in (uid, path, result.bandwidth, result.task, result.lang, result.text,
                                          seg_field)) + "\n"


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fairseq_smoe.cli.transcribe", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", help="folder with the checkpoint (and, by default, config.yaml, dictionary, spm)")
    p.add_argument("inputs", nargs="*", help="audio files and folders")
    p.add_argument("--list", action="append", default=[], metavar="FILE",
                   help="text file of audio paths, one a line ('id<TAB>path' sets the id); repeatable")
    p.add_argument("--checkpoint-file", default="checkpoint_best.pt")
    p.add_argument("--data", default=".", help="folder with config.yaml, the dictionary and the SentencePiece "
                                               "model (relative to MODEL_DIR when it starts with '.')")
    p.add_argument("--config-yaml", default="config.yaml")
    p.add_argument("--task", choices=["asr", "st"], default="asr", help="asr: transcribe, st: translate")
    p.add_argument("--lang", default=None, help="output language (asr: the spoken one; st: the target)")
    p.add_argument("--bandwidth", default=None,
                   help="route every file as this bandwidth (nb/wb) instead of detecting it")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--lenpen", type=float, default=1.0)
    p.add_argument("--max-len-a", type=float, default=0.0)
    p.add_argument("--max-len-b", type=int, default=200)
    p.add_argument("--ctc-weight", type=float, default=None, help="joint CTC/attention weight (ASR)")
    p.add_argument("--max-tokens", type=int, default=20000, help="fbank frames per batch")
    p.add_argument("--batch-files", type=int, default=16, help="files read and decoded together")
    p.add_argument("--segment", choices=["auto", "always", "never"], default="auto",
                   help="cut into speech segments: files longer than --long-audio-s (auto), every file, none")
    p.add_argument("--long-audio-s", type=float, default=30.0)
    p.add_argument("--vad", choices=["auto", "webrtc", "energy"], default="auto")
    p.add_argument("--format", choices=FORMATS, default=None, help="default: from --output's extension, else tsv")
    p.add_argument("--output", "-o", default=None, help="output file (resumed when it exists); default stdout")
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = get_parser()
    try:
        args = parser.parse_intermixed_args(argv)  # MODEL_DIR --data D audio/ : inputs after options
    except SystemExit as e:  # argparse exits 2 on usage errors, 0 on --help
        return int(e.code or 0)
    # fairseq's loading chatter (INFO) would bury the per-file reports
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING, stream=sys.stderr)
    fmt = args.format or ("jsonl" if args.output and args.output.endswith((".jsonl", ".json")) else "tsv")
    try:
        pairs = collect_inputs(args.inputs, args.list)
        if not pairs:
            raise UsageError("no audio files: give files, folders or --list FILE")
        if args.batch_files < 1:
            raise UsageError("--batch-files must be at least 1")
        done = read_done_ids(args.output, fmt) if args.output else set()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    todo = [(uid, path) for uid, path in pairs if uid not in done]
    if done:
        print(f"{args.output}: {len(pairs) - len(todo)} of {len(pairs)} files already done, resuming", file=sys.stderr)

    import torch
    from tqdm import tqdm

    from ..data.audio import AudioError
    from ..hub import HubError, from_pretrained

    try:
        hub = from_pretrained(args.model_dir, checkpoint_file=args.checkpoint_file, data_name_or_path=args.data,
                              config_yaml=args.config_yaml)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if torch.cuda.is_available() and not args.cpu:
        hub = hub.cuda()
    gen = dict(task=args.task, tgt_lang=args.lang, bandwidth=args.bandwidth, beam=args.beam, lenpen=args.lenpen,
               max_len_a=args.max_len_a, max_len_b=args.max_len_b, ctc_weight=args.ctc_weight,
               max_tokens=args.max_tokens, segment={"auto": "auto", "always": True, "never": False}[args.segment],
               long_audio_s=args.long_audio_s, vad=args.vad)
    try:  # a request the model cannot serve fails every file the same way: say it once, as a usage error
        hub._route(args.task, args.lang)
        if args.bandwidth and args.bandwidth not in hub.routing_table.encoder_routes:
            raise HubError(f"--bandwidth {args.bandwidth}: the model's encoder routes are "
                           f"{list(hub.routing_table.encoder_routes)}")
    except HubError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    out = open(args.output, "a", encoding="utf-8") if args.output else sys.stdout
    if fmt == "tsv" and (out is sys.stdout or out.tell() == 0):
        out.write("\t".join(TSV_COLUMNS) + "\n")
        out.flush()
    failed: List[Tuple[str, str]] = []

    def fail(path, reason):
        failed.append((path, reason))
        tqdm.write(f"FAILED {path}: {reason}", file=sys.stderr)

    def emit(uid, path, result):
        out.write(format_row(fmt, uid, path, result))
        out.flush()

    bar = tqdm(total=len(todo), unit="file", disable=args.no_progress, file=sys.stderr)
    try:
        for start in range(0, len(todo), args.batch_files):
            chunk = todo[start:start + args.batch_files]
            loaded = []
            for uid, path in chunk:
                try:
                    loaded.append((uid, path, hub.load_audio(path)))
                except AudioError as e:
                    fail(path, _reason(e, path))
                    bar.update(1)
            try:
                results = hub.generate([wav for _, _, wav in loaded], **gen) if loaded else []
            except (AudioError, HubError, RuntimeError):  # one bad file spoils the batch: find it, keep the rest
                results = []
                for uid, path, wav in loaded:
                    try:
                        results.append(hub.generate(wav, **gen))
                    except (AudioError, HubError, RuntimeError) as e:
                        results.append(e)
            for (uid, path, _), result in zip(loaded, results):
                if isinstance(result, Exception):
                    fail(path, _reason(result, path))
                else:
                    emit(uid, path, result)
                bar.update(1)
    finally:
        bar.close()
        if out is not sys.stdout:
            out.close()
    if failed:
        print(f"{len(failed)} of {len(todo)} files failed:", file=sys.stderr)
        for path, reason in failed:
            print(f"  {path}: {reason}", file=sys.stderr)
        return 1
    return 0


def _reason(error: Exception, path: str) -> str:
    """The error message without a leading copy of the path (the report puts the path first)."""
    msg = str(error)
    for prefix in (f"{path}: ", "input 0: "):
        if msg.startswith(prefix):
            return msg[len(prefix):]
    return msg


if __name__ == "__main__":
    sys.exit(main())
