"""Datasets of heft's own lm-evaluation-harness tasks, read from the JSONL files beside this one
(lm-eval's `custom_dataset`), so that they run with no network and no dataset cache."""

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def _jsonl(name: str) -> list[dict]:
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def shakespeare_cloze(**kwargs):
    """{"test": Dataset} of heft_shakespeare_cloze.jsonl: context, four choices, label."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(_jsonl("heft_shakespeare_cloze.jsonl"))})
