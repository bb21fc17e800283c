"""`--executor local|ray` and `--ray-address`: where the shard-independent work of a command runs (quant.executor).

Shared by every command that takes them, so they mean the same everywhere; a command adds them with one call and
turns the parsed flags into an executor with another."""

from __future__ import annotations

import argparse

from quant.executor import EXECUTORS, Executor, executor_or_none


def add_executor_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("where to run (quant.executor)")
    group.add_argument("--executor", choices=EXECUTORS, default="local",
                       help="local: in this process (default, Ray not imported); ray: the work in shards on a Ray "
                       "cluster, same results (pip install -e '.[ray]')")
    group.add_argument("--ray-address", metavar="ADDR",
                       help="with --executor ray: `auto` joins the cluster this machine is part of (ray start), "
                       "host:6379 or ray://host:10001 another one; default: start a local Ray instance")


def executor_from_args(args: argparse.Namespace) -> Executor | None:
    """The executor the flags ask for; None for local: the command runs its in-process path (no shards)."""
    return executor_or_none(getattr(args, "executor", "local"), getattr(args, "ray_address", None))


def executor_changes(args: argparse.Namespace) -> dict[str, str | None]:
    """The flags as option fields (quant.pipeline.RunOptions executor / ray_address), checked now."""
    executor_from_args(args)
    return {"executor": getattr(args, "executor", "local"), "ray_address": getattr(args, "ray_address", None)}
