"""`scldm-scale train recipes/census.yaml --dry-run`: the run plan from the recipe alone."""

import math
from pathlib import Path

import pytest
import torch

from scldm_scale.cli import main
from scldm_scale.config import load_config
from scldm_scale.errors import ScldmError
from scldm_scale.nn.vae import ScVAE, VAEConfig
from scldm_scale.scaling.plan import run_plan

REPO = Path(__file__).resolve().parents[2]
CENSUS = str(REPO / "recipes" / "census.yaml")
CENSUS_LDM = str(REPO / "recipes" / "census_ldm.yaml")


def test_census_dry_run_prints_the_plan_without_touching_data(capsys, monkeypatch):
    import scldm_scale.data.loader as loader

    def no_data(*args, **kwargs):
        raise AssertionError("the dry run read data")

    monkeypatch.setattr(loader, "build_source", no_data)
    main(["train", CENSUS, "--dry-run"])
    text = capsys.readouterr().out
    for needle in ("run plan: census-vae", "Census 2025-01-30", "is_primary_data == True", "parameters",
                   "FLOPs/cell", "48,829 steps x global batch 4,096", "GPU-hours at 25% MFU", "latent cache",
                   "checkpoints", "sbatch --nodes=2 --gpus-per-node=8 launch/slurm.sbatch"):
        assert needle in text, needle
    main(["train", CENSUS, CENSUS_LDM, "--dry-run"])
    text = capsys.readouterr().out
    assert "run plan: census-ldm (stage ldm)" in text and "dit.n_heads 16" in text and "latent tokens (m) 64" in text


def test_plan_figures_follow_from_the_formulas():
    cfg = load_config([CENSUS])
    plan = run_plan(cfg)
    world = 16
    assert plan["world_size"] == world and cfg.vae.n_heads == 1024 // 64 and cfg.vae.n_genes == 60664
    assert plan["steps"] == math.ceil(200_000_000 / (256 * world)) and plan["cells"] == plan["steps"] * 256 * world
    model_cfg = VAEConfig(**{k: v for k, v in dict(cfg.vae).items() if k in VAEConfig.__dataclass_fields__})
    with torch.device("meta"):
        model = ScVAE(model_cfg)
    assert plan["params"] == sum(p.numel() for p in model.parameters())
    assert plan["params"] - plan["params_non_embedding"] == 60664 * (1024 + 1)  # gene table + dispersions
    assert plan["flops_per_cell"] == pytest.approx(3 * model.flops_per_cell(2048, 2048 + 2048))
    assert plan["flops"] == pytest.approx(plan["flops_per_cell"] * plan["cells"])
    assert plan["gpu_hours"] == pytest.approx(plan["flops"] / (989e12 * 0.25) / 3600)
    assert plan["latent_cache_bytes"] == 40_000_000 * (64 * 32 * 4 + 6 * 8 + 8)
    assert plan["checkpoint_bytes"] == plan["params"] * (4 + 8 + 2)  # fp32 master, Adam moments, bf16 weights


def test_dry_run_names_what_it_needs():
    cfg = load_config([CENSUS], ["plan.n_genes=0", "data.vocab_path="])
    with pytest.raises(ScldmError, match="plan.n_genes"):
        run_plan(cfg)
    cfg = load_config([CENSUS], ["plan.genes_per_cell=0"])
    with pytest.raises(ScldmError, match="plan.genes_per_cell"):
        run_plan(cfg)
    cfg = load_config([CENSUS], ["plan.label_cardinalities=[3]"])
    with pytest.raises(ScldmError, match="plan.label_cardinalities has 1 values"):
        run_plan(cfg)
