from __future__ import annotations

import json

import pytest

from hf_ftkit.errors import BadInputError
from hf_ftkit.forgetting.heldout import Document, load_texts, overlapping, sample_documents


def test_files_directories_columns_and_lists(tmp_path, heldout_texts):
    (tmp_path / "a.txt").write_text(heldout_texts[0])
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"id": i, "content": t}) + "\n"
                                               for i, t in enumerate(heldout_texts[1:3])))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": heldout_texts[3:5]}), tmp_path / "c.parquet")
    texts = load_texts(tmp_path)
    assert texts == [heldout_texts[0], *heldout_texts[1:3], *heldout_texts[3:5]]  # sorted files, detected columns
    assert load_texts(tmp_path / "b.jsonl", column="content") == heldout_texts[1:3]
    assert load_texts(["one", "two"]) == ["one", "two"]
    with pytest.raises(BadInputError, match="no column 'text'"):
        load_texts(tmp_path / "b.jsonl", column="text")
    with pytest.raises(BadInputError, match="not a file, a directory or a loadable dataset"):
        load_texts("no-such-org/no-such-dataset:default:test")


def test_sample_is_deterministic_and_bounded(heldout_texts):
    first = sample_documents(heldout_texts, max_bytes=20_000, seed=1)
    assert first == sample_documents(heldout_texts, max_bytes=20_000, seed=1)
    assert first != sample_documents(heldout_texts, max_bytes=20_000, seed=2)
    assert sum(d.bytes for d in first[:-1]) < 20_000 <= sum(d.bytes for d in first)


def test_word_and_byte_weights_follow_lm_eval():
    doc = Document("naïve  café\nau lait ")
    assert doc.bytes == len("naïve  café\nau lait ".encode()) and doc.words == 5  # re.split(r"\s+") keeps ""


def test_overlap_with_training_text_is_found(heldout_texts):
    docs = [Document(t) for t in heldout_texts[:4]]
    leaked = ["Some chat turn. " + " ".join(heldout_texts[2].split()[10:40]) + " end."]
    assert overlapping(docs, leaked) == 1
    assert overlapping(docs, ["entirely different words that appear nowhere in the standard library docs"]) == 0
