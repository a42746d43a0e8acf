"""Service configs: flags, environment defaults, and what is required."""

from __future__ import annotations

import argparse

import pytest

from services.common.config import add_config_arguments, config_from_args
from services.launcher import split_layers
from services.stage.server import StageConfig


def parse(argv, monkeypatch=None):
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_config_arguments(parser, StageConfig)
    return config_from_args(StageConfig, parser.parse_args(argv))


def test_flags_override_environment_which_overrides_defaults(monkeypatch):
    monkeypatch.setenv("VLMESH_KV_BUDGET_MB", "64")
    monkeypatch.setenv("VLMESH_LAYERS", "0:3")
    cfg = parse(["--model", "/m"])
    assert (cfg.kv_budget_mb, cfg.layer_range(), cfg.port, cfg.log_format) == (64, (0, 3), 50061, "text")
    cfg = parse(["--model", "/m", "--kv-budget-mb", "8", "--layers", "2:4"])
    assert (cfg.kv_budget_mb, cfg.layer_range()) == (8, (2, 4))


def test_required_and_malformed(monkeypatch):
    monkeypatch.delenv("VLMESH_LAYERS", raising=False)
    with pytest.raises((SystemExit, argparse.ArgumentError)):
        parse(["--model", "/m"])
    with pytest.raises(ValueError, match="START:END"):
        parse(["--model", "/m", "--layers", "3"]).layer_range()


def test_split_layers_is_contiguous_and_even():
    assert split_layers(28, 4) == [(0, 7), (7, 14), (14, 21), (21, 28)]
    assert split_layers(5, 2) == [(0, 3), (3, 5)]
    with pytest.raises(ValueError):
        split_layers(3, 4)
