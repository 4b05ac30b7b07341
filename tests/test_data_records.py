"""ArrayRecord sources: what the converter's metadata promises is checked, errors name the file."""

import json
import pathlib

from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image
import pytest

from jaxcls.data import pipeline
from jaxcls.data import records
from jaxcls.data import sources
from helpers import array_record_config, color, encode


def write_records(directory: pathlib.Path, labels, class_names, **meta_overrides):
  directory.mkdir(parents=True, exist_ok=True)
  writer = ArrayRecordWriter(str(directory / "train-00000-of-00001.array_record"),
                             records.WRITER_OPTIONS)
  for i, label in enumerate(labels):
    image = encode(Image.new("RGB", (8, 8), color(i)), "PNG")
    writer.write(records.encode_record(label, f"img{i}.png", image))
  writer.close()
  meta = dict(format=records.FORMAT, split="train", num_examples=len(labels),
              class_names=class_names, class_counts=[1] * len(class_names),
              shards=["train-00000-of-00001.array_record"])
  meta.update(meta_overrides)
  (directory / "train.json").write_text(json.dumps(meta))


def test_array_record_label_outside_the_classes_is_an_error(tmp_path):
  write_records(tmp_path, [0, 1, 5], ["a", "b", "c"])
  config = array_record_config(tmp_path)
  source = sources.create_source(config, "train")
  ds = pipeline.create_eval_dataset(config, source, 3, process_index=0, process_count=1)
  with pytest.raises(ValueError, match=r"train\[2\] \(img2\.png\) has label 5, outside \[0, 3\)"):
    list(ds)


@pytest.mark.parametrize("change,split,message", [
    ({}, "test", r"Split 'test' .* has no .*test\.json; splits written there .*\['train'\]"),
    (dict(format="other"), "train", r"is not a jaxcls-array-record-1 file"),
    (dict(class_counts=[2, 1]), "train", r"class_counts \[2, 1\] do not fit 3 class names"),
    (dict(num_examples=4, class_counts=[2, 1, 1]), "train", r"the shards hold 3 records, .* 4"),
    (dict(shards=["gone.array_record"]), "train", r"Shard .*gone\.array_record .* is missing"),
])
def test_array_record_errors(tmp_path, change, split, message):
  write_records(tmp_path, [0, 1, 2], ["a", "b", "c"], **change)
  with pytest.raises(ValueError, match=message):
    sources.create_source(array_record_config(tmp_path), split)


def test_array_record_path_errors(tmp_path):
  with pytest.raises(ValueError, match=r"config\.data\.path='.*nowhere' is not a directory"):
    sources.create_source(array_record_config(tmp_path / "nowhere"), "train")
  with pytest.raises(ValueError, match=r"source='array_record' needs config\.data\.path"):
    sources.create_source(array_record_config(""), "train")
