"""Fine-tuning readers on real slices of ../shared/data: formats, fields, labels, and errors that name the row."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import require_shared_data
from finetune_data import bigbench_slice, movie_tsv, spam_dir

from pipeline.config import from_dict
from pipeline.errors import UserError
from pipeline.finetune.config import SourceConfig, TaskConfig
from pipeline.finetune.data import holdout, subset
from pipeline.finetune.readers import choice_examples, email_text, read_squad, text_examples

SENTIMENT = TaskConfig(kind="classification", labels=["negative", "positive"])


def source(**fields) -> SourceConfig:
    return from_dict(SourceConfig, fields)


@pytest.fixture(scope="module")
def data():
    return require_shared_data()


def test_movie_snippets_tsv_with_rating_threshold(data, tmp_path):
    path = movie_tsv(data, tmp_path / "movies.tsv", 50)
    examples = text_examples(
        source(path=str(path), format="tsv", header=False, text_field="2", label_field="1", label_threshold=0.0),
        SENTIMENT,
    )
    assert len(examples) == 50
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()]
    for e, row in zip(examples, rows, strict=True):
        assert e.text == row[2].rstrip("\r") and e.label == int(float(row[1]) > 0)
    assert examples[0].uid.endswith("movies.tsv:1") and "''Conan''" in examples[0].text  # quotes are text in TSV


def test_the_same_examples_from_jsonl_csv_and_parquet(data, tmp_path):
    tsv = movie_tsv(data, tmp_path / "movies.tsv", 30)
    rows = [line.split("\t") for line in tsv.read_text(encoding="utf-8").splitlines()]
    records = [{"review": r[2].rstrip("\r"), "sentiment": "positive" if float(r[1]) > 0 else "negative"} for r in rows]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    with open(tmp_path / "m.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, ["review", "sentiment"])
        writer.writeheader()
        writer.writerows(records)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "m.parquet")
    results = [
        text_examples(source(path=str(tmp_path / name), text_field="review", label_field="sentiment"), SENTIMENT)
        for name in ("m.jsonl", "m.csv", "m.parquet")
    ]
    expected = [(r["review"], SENTIMENT.labels.index(r["sentiment"])) for r in records]
    for examples in results:
        assert [(e.text, e.label) for e in examples] == expected


def test_a_label_outside_the_set_is_an_error_naming_the_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine", "label": "positive"}\n{"text": "meh", "label": "neutral"}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: label 'neutral' is not one of task\.labels"):
        text_examples(source(path=str(path)), SENTIMENT)
    path.write_text('{"text": "fine", "label": "positive"}\n{"body": "no text field", "label": "positive"}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: no text field 'text'"):
        text_examples(source(path=str(path)), SENTIMENT)


def test_vitaminc_pairs_from_bigbench(data, tmp_path):
    path = bigbench_slice(data, "vitaminc_task.json.gz", tmp_path / "vitaminc.json", 40)
    task = TaskConfig(kind="pair_classification", labels=["True", "False", "Neither"])
    examples = text_examples(source(path=str(path), pair_separator="\nClaim: "), task)
    raw = json.loads(path.read_text())["examples"]
    for e, r in zip(examples, raw, strict=True):
        assert f"{e.text}\nClaim: {e.text_pair}" == r["input"]
        assert task.labels[e.label] == max(r["target_scores"], key=r["target_scores"].get)
    with pytest.raises(UserError, match=r"vitaminc\.json#examples\[0\]: no second text"):
        text_examples(source(path=str(path), pair_separator="\nHypothesis: "), task)


def test_social_iqa_choices_from_bigbench(data, tmp_path):
    path = bigbench_slice(data, "social_iqa_task.json.gz", tmp_path / "siqa.json", 2000)
    examples = choice_examples(source(path=str(path)), TaskConfig(kind="multiple_choice"))
    assert len(examples) == 1954
    assert {len(e.choices) for e in examples} == {2, 3}  # a few items have two choices
    first = examples[0]
    assert first.choices[first.label] == "Find somewhere to go"


def test_spam_archive_records_and_mail_bodies(data, tmp_path):
    directory = spam_dir(data, tmp_path / "spam", per_class=5)
    task = TaskConfig(kind="classification", labels=["ham", "spam"])
    src = source(path=str(directory), format="json_archive", label_field="group", text_format="email",
                 label_map={"spam-1": "spam", "easy-ham-1": "ham"})  # fmt: skip
    examples = text_examples(src, task)
    assert sorted(e.label for e in examples) == [0] * 5 + [1] * 5
    for e in examples:
        assert "Return-Path:" not in e.text and "Received:" not in e.text  # headers other than Subject dropped
    raw = "Subject: Cheap =?utf-8?q?w=C3=A4tches?=\nContent-Transfer-Encoding: base64\n\nQnV5IG5vdyE=\n"
    assert email_text(raw) == "Cheap wätches\nBuy now!"
    html = "Subject: Hi\nContent-Type: text/html\n\n<html><style>p {}</style><p>Caf&eacute; <b>deal</b></p></html>"
    assert email_text(html) == "Hi\n Café deal"


def test_squad_json_and_dev_holdout_by_article(data):
    examples = read_squad(source(path=str(data / "finetune" / "squadshifts_new_wiki_v1.0.json.gz")))
    assert len(examples) == 7936
    train, dev = holdout(examples, [e.article for e in examples], 0.1, seed=1)
    assert len(train) + len(dev) == len(examples)
    assert not {e.article for e in train} & {e.article for e in dev}
    assert holdout(examples, [e.article for e in examples], 0.1, seed=1)[1] == dev
    assert len(subset(train, 100, seed=3)) == 100 and subset(train, 100, seed=3) == subset(train, 100, seed=3)


def write_json_array(path, records) -> None:
    """A JSON array as people write them: one record per line, pretty-printed ones across lines."""
    text = "[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n"
    if path.name.endswith(".gz"):
        import gzip

        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")


def test_a_json_array_of_records_is_read_and_detected(tmp_path):
    records = [{"text": f"review {i}", "label": i % 2} for i in range(5)]
    for name in ("reviews.json", "reviews.json.gz"):
        write_json_array(tmp_path / name, records)
        for fmt in ("json", "auto"):  # auto: a .json file holding an array
            examples = text_examples(source(path=str(tmp_path / name), format=fmt,
                                            label_map={"0": "negative", "1": "positive"}), SENTIMENT)  # fmt: skip
            assert [(e.text, e.label) for e in examples] == [(r["text"], r["label"]) for r in records]
            assert examples[0].uid.endswith(f"{name}:2") and examples[4].uid.endswith(f"{name}:6")  # file:line
    # pretty-printed records: each named by the line it starts on
    (tmp_path / "pretty.json").write_text(json.dumps(records, indent=2))
    numbers = {"0": "negative", "1": "positive"}
    examples = text_examples(source(path=str(tmp_path / "pretty.json"), label_map=numbers), SENTIMENT)
    assert [e.uid.rsplit(":", 1)[1] for e in examples] == ["2", "6", "10", "14", "18"]
    # read as jsonl, the array is named for what it is
    with pytest.raises(UserError, match=r"reviews\.json:1: invalid JSON .*one JSON array of records is format json"):
        text_examples(source(path=str(tmp_path / "reviews.json"), format="jsonl"), SENTIMENT)
    (tmp_path / "oneline.json").write_text(json.dumps(records))
    with pytest.raises(UserError, match=r"oneline\.json:1: a record must be a JSON object, got a list; .* format json"):
        text_examples(source(path=str(tmp_path / "oneline.json"), format="jsonl"), SENTIMENT)
    (tmp_path / "object.json").write_text('{"reviews": []}')
    with pytest.raises(UserError, match=r"object\.json: holds an object with keys 'reviews', not a JSON array"):
        text_examples(source(path=str(tmp_path / "object.json")), SENTIMENT)
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in records))  # JSON Lines, .json name
    assert len(text_examples(source(path=str(tmp_path / "lines.json"), label_map={"0": "negative", "1": "positive"}),
                             SENTIMENT)) == 5  # fmt: skip


def test_label_map_keys_match_numeric_labels_and_null_labels_are_named(tmp_path):
    from pipeline.config import build_config
    from pipeline.finetune.config import FinetuneJobConfig

    path = tmp_path / "scores.json"
    write_json_array(path, [{"text": "good", "label": 1}, {"text": "bad", "label": 0.0}, {"text": "?", "label": None}])
    (tmp_path / "ft.yaml").write_text("task:\n  labels: [negative, positive]\ndata:\n  train:\n"
                                      "    path: scores.json\n    label_map: {0: negative, 1: positive}\n")  # fmt: skip
    cfg = build_config(FinetuneJobConfig, tmp_path / "ft.yaml")  # YAML int keys: compared as text
    with pytest.raises(UserError, match=r"scores\.json:4: null label \(field 'label' is null\)"):
        text_examples(cfg.data.train, cfg.task)
    write_json_array(path, [{"text": "good", "label": 1}, {"text": "bad", "label": 0.0}])
    assert [e.label for e in text_examples(cfg.data.train, cfg.task)] == [1, 0]
    (tmp_path / "n.jsonl").write_text('{"text": "x", "label": "positive"}\n{"text": "y", "label": null}\n')
    with pytest.raises(UserError, match=r"n\.jsonl:2: null label"):
        text_examples(source(path=str(tmp_path / "n.jsonl")), SENTIMENT)
