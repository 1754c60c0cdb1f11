"""Turn raw documents into WebDataset .tar shards of BERT sentence pairs (with NSP labels) or GPT token blocks.

The inputs are cut into work units that do not depend on the number of workers or tasks, so the same inputs,
seed and config give byte-identical shards for any --workers and any --num-tasks split. Completed units are
committed atomically: re-running an interrupted command keeps verified shards and redoes only the rest.

Many machines: give each task --num-tasks N --task-index I (taken from SLURM_ARRAY_TASK_COUNT and
SLURM_ARRAY_TASK_ID in an array job) with the same --output on a shared filesystem, then run
`python -m pipeline merge DIR` once every task has finished.

examples:
  python -m pipeline shard --input corpus/ --tokenizer tok/ --output shards/ --objective bert --seq-len 128
  python -m pipeline shard --config configs/preprocess/demo-gpt.yaml --tokenizer tok/ --output shards-gpt/ --workers 2
"""

from __future__ import annotations

import argparse

from pipeline.config import add_config_arguments, config_from_args
from pipeline.preprocess.config import ShardJobConfig
from pipeline.preprocess.report import print_report
from pipeline.preprocess.sharder import run_sharding


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, ShardJobConfig)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(ShardJobConfig, args)
    report = run_sharding(cfg)
    print_report(report)
    return 0
