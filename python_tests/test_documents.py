"""Plain documents for a causal LM (issue 16 item 1): ``load_documents`` reads a ``.txt`` file as one
document per non-empty line, and a table's text column without asking for labels.

Every case writes small files in ``tmp_path`` (the packaged BBC News corpus excepted); nothing is
downloaded."""

from __future__ import annotations

import datasets
import pytest

from fedlora_ext.data.text import load_documents, load_text


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def write_csv(path, header, rows):
    """A CSV of plain cells (no commas or quotes in them)."""
    path.write_text("".join(",".join(cells) + "\n" for cells in [header, *rows]), encoding="utf-8")
    return str(path)


def texts(data) -> list[str]:
    return list(data["text"])


def all_texts(data) -> list[str]:
    return texts(data.train) + texts(data.test)


def test_a_text_file_is_one_document_per_line_split_train_and_test(tmp_path):
    lines = [f"document number {i} about something" for i in range(20)]
    data = load_documents(write_lines(tmp_path / "corpus.txt", lines), seed=0)
    assert (len(data.train), len(data.test)) == (16, 4)
    assert sorted(all_texts(data)) == sorted(lines)
    assert data.label_names == []
    assert set(data.train["label"]) | set(data.test["label"]) == {0}
    assert data.eval_split == "a seeded 20% split of the data"
    assert data.notes == ()
    again = load_documents(str(tmp_path / "corpus.txt"), seed=0)
    assert texts(again.test) == texts(data.test) and again.fingerprint == data.fingerprint
    assert texts(load_documents(str(tmp_path / "corpus.txt"), seed=1).test) != texts(data.test)


def test_empty_lines_separate_documents_and_are_counted(tmp_path):
    lines = ["first one", "", "second one", "   ", "third one", "", "", "fourth one", "fifth one"]
    data = load_documents(write_lines(tmp_path / "corpus.txt", lines), seed=0)
    assert sorted(all_texts(data)) == sorted(["first one", "second one", "third one", "fourth one", "fifth one"])
    assert (len(data.train), len(data.test)) == (4, 1)
    assert any("skipped 4 empty line(s)" in note for note in data.notes), data.notes


def test_a_folder_of_text_files_keeps_its_own_test_split(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_lines(folder / "train.txt", ["a one", "", "a two", "a three"])
    write_lines(folder / "test.txt", ["b one", "b two"])
    data = load_documents(str(folder), seed=0)
    assert sorted(texts(data.train)) == ["a one", "a three", "a two"]
    assert texts(data.test) == ["b one", "b two"]
    assert data.eval_split == "the dataset's own 'test' split"
    assert any("skipped 1 empty line(s)" in note for note in data.notes), data.notes


def test_a_csv_with_only_a_text_column_loads(tmp_path):
    rows = [[f"row {i} of the table"] for i in range(10)]
    data = load_documents(write_csv(tmp_path / "docs.csv", ["text"], rows), seed=0)
    assert sorted(all_texts(data)) == sorted(r[0] for r in rows)
    assert (len(data.train), len(data.test)) == (8, 2)
    assert data.notes == ()
    with pytest.raises(ValueError, match="no text/label columns"):  # load_text still wants labels
        load_text(str(tmp_path / "docs.csv"), seed=0)


def test_a_csv_with_a_label_column_loads_and_the_label_is_ignored_with_a_note(tmp_path):
    rows = [[f"row {i} of the table", "pos" if i % 2 else "neg"] for i in range(10)]
    data = load_documents(write_csv(tmp_path / "docs.csv", ["text", "label"], rows), seed=0)
    assert sorted(all_texts(data)) == sorted(r[0] for r in rows)
    assert set(data.train["label"]) | set(data.test["label"]) == {0}
    assert data.label_names == []
    assert any("'label'" in note and "ignored" in note for note in data.notes), data.notes
    # the same seed and row count choose the same rows as load_text
    assert texts(data.test) == texts(load_text(str(tmp_path / "docs.csv"), seed=0).test)


def test_text_column_names_the_column(tmp_path):
    rows = [[f"body {i}", f"title {i}"] for i in range(10)]
    path = write_csv(tmp_path / "docs.csv", ["body", "title"], rows)
    with pytest.raises(ValueError, match="no text column found.*set text_column"):
        load_documents(path, seed=0)
    data = load_documents(path, seed=0, text_column="title")
    assert sorted(all_texts(data)) == sorted(r[1] for r in rows)


def test_empty_text_cells_are_refused_with_row_numbers_or_dropped(tmp_path):
    rows = [[f"row {i}" if i not in (2, 6) else '""'] for i in range(10)]  # a quoted empty cell (a bare one is a blank line)
    path = write_csv(tmp_path / "docs.csv", ["text"], rows)
    with pytest.raises(ValueError) as refused:
        load_documents(path, seed=0)
    message = str(refused.value)
    assert "2 row(s) have an empty or non-text value in text_column 'text'" in message
    assert "data rows 3, 7" in message and "drop_invalid_rows=true" in message
    data = load_documents(path, seed=0, drop_invalid_rows=True)
    assert sorted(all_texts(data)) == sorted(r[0] for r in rows if r[0] != '""')
    assert any("dropped 2 of 10 rows" in note for note in data.notes), data.notes


def test_non_string_text_cells_are_refused(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(f'{{"text": {value}}}\n' for value in ['"one"', '"two"', "null", '"four"', '"five"']))
    with pytest.raises(ValueError, match="1 row\\(s\\) have an empty or non-text value.*data rows 3"):
        load_documents(str(path), seed=0)


def test_a_saved_dataset_dict_uses_its_own_test_split(tmp_path):
    splits = {"train": [f"train {i}" for i in range(12)], "test": [f"test {i}" for i in range(3)]}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()}).save_to_disk(
        str(tmp_path / "saved"))
    data = load_documents(str(tmp_path / "saved"), seed=0)
    assert sorted(texts(data.train)) == sorted(splits["train"])
    assert texts(data.test) == splits["test"]
    assert data.eval_split == "the dataset's own 'test' split"


def test_the_fingerprint_follows_the_content(tmp_path):
    lines = [f"line {i}" for i in range(10)]
    path = write_lines(tmp_path / "corpus.txt", lines)
    before = load_documents(path, seed=0).fingerprint
    assert load_documents(path, seed=0).fingerprint == before
    write_lines(tmp_path / "corpus.txt", [*lines[:4], "line 4, edited", *lines[5:]])
    assert load_documents(path, seed=0).fingerprint != before


def test_too_few_documents_leave_an_empty_split(tmp_path):
    with pytest.raises(ValueError, match="the test split is empty"):
        load_documents(write_lines(tmp_path / "corpus.txt", ["only one", "", ""]), seed=0)


def test_packaged_bbc_news_gives_all_its_articles():
    try:
        data = load_documents("bbc_news", seed=0)
    except FileNotFoundError as error:
        pytest.skip(str(error))
    assert len(data.train) + len(data.test) == 2225
    assert data.label_names == []
    text = load_text("bbc_news", seed=0)
    assert texts(data.test) == texts(text.test)  # the same rows as the classification split
    assert data.fingerprint != text.fingerprint
