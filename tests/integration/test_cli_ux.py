"""What a user meets at the command line: help text, version, printed config, progress in logs, the
run-directory guard and a W&B run that continues when training resumes."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from tests.cli_utils import REPO, TINY_VAE, cli, read_metrics

pytestmark = pytest.mark.integration


def test_every_command_and_option_has_help_with_an_example():
    from scldm_scale.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) >= {"prepare", "train", "encode", "generate", "transfer", "evaluate", "export", "demo"}
    for name, p in sub.choices.items():
        assert "examples:" in (p.epilog or ""), name
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest}: no help text"
            if action.option_strings and action.nargs != 0:  # options that take a value show one
                assert "e.g." in action.help, f"{name} {action.option_strings}: no example"


def test_option_choices_are_the_enums():
    """The CLI lists choices as strings (importing the enums would import torch for --help)."""
    from scldm_scale.cli import build_parser
    from scldm_scale.config import DecodeGenes
    from scldm_scale.flow.samplers import SamplerKind
    from scldm_scale.scaling.fit import BootstrapMethod
    from scldm_scale.scaling.sweep import Launcher

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices

    def choices(command: str, option: str) -> set[str]:
        return set(next(a for a in sub[command]._actions if option in a.option_strings).choices)

    assert choices("generate", "--sampler") == choices("transfer", "--sampler") == {k.value for k in SamplerKind}
    assert choices("sweep", "--launcher") == {k.value for k in Launcher}
    assert choices("report", "--bootstrap-method") == {k.value for k in BootstrapMethod}
    assert choices("sizes", "--decode") == {k.value for k in DecodeGenes}


def test_version_and_python_m():
    from scldm_scale import __version__

    out = subprocess.run([sys.executable, "-m", "scldm_scale", "--version"], capture_output=True, text=True,
                         cwd=REPO, env={"PYTHONPATH": str(REPO)})
    assert out.returncode == 0 and out.stdout.strip() == f"scldm-scale {__version__}"
    helped = subprocess.run([sys.executable, "-m", "scldm_scale", "generate", "--help"], capture_output=True,
                            text=True, cwd=REPO, env={"PYTHONPATH": str(REPO)})
    assert helped.returncode == 0 and "--guidance-interval" in helped.stdout and "examples:" in helped.stdout


def test_print_config_resolves_without_training(tmp_path):
    proc = cli("train", "recipes/quickstart.yaml", "train.max_steps=77", f"run.output_dir={tmp_path}",
               "--print-config")
    assert "max_steps: 77" in proc.stdout and "vae_preset: vae-xs" in proc.stdout
    assert not any(tmp_path.iterdir())  # nothing written


def test_progress_lines_guard_and_wandb_resume(tiny_atlas, tmp_path):
    args = [*TINY_VAE, f"data.path={tiny_atlas}", f"run.output_dir={tmp_path}", "run.name=run", "train.max_steps=4",
            "train.log_every=2", "logging.progress=true", "logging.wandb=true", "logging.wandb_mode=offline",
            "train.ckpt_every=0"]
    first = cli("train", *args, "train.stop_at_step=2")
    # stdout is a pipe here, as in a SLURM log: one plain line per log step
    lines = [line for line in first.stdout.splitlines() if line.startswith("vae: ")]
    assert len(lines) == 1 and lines[0].startswith("vae: 2/4 (50%) loss ") and "cells/s" in lines[0]
    run_id = (tmp_path / "run" / "wandb_run_id").read_text().strip()

    again = cli("train", *args, check=False)  # a fresh run into a run directory that holds one
    errors = [line for line in again.stderr.splitlines() if line.startswith("error:")]
    assert again.returncode == 2 and len(errors) == 1, again.stderr[-2000:]
    assert "run.resume=true" in errors[0] and "run.overwrite=true" in errors[0]
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [2]  # untouched

    cli("train", *args, "run.resume=true")
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [2, 4]
    assert (tmp_path / "run" / "wandb_run_id").read_text().strip() == run_id
    runs = [p.name for p in (tmp_path / "run" / "wandb").glob("offline-run-*")]
    assert len(runs) >= 2 and all(name.endswith(run_id) for name in runs)  # one W&B run, resumed

    cli("train", *args, "run.overwrite=true", "train.max_steps=2")
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [2]  # a new run: the old records are gone
    assert (tmp_path / "run" / "wandb_run_id").read_text().strip() != run_id
