"""Config: merge order, overrides, unknown-key errors, presets, derived values."""

import pytest
from omegaconf import OmegaConf

from scldm_scale.config import Stage, derive, load_config, save_config, to_object
from scldm_scale.errors import ScldmError


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_recipes_merge_left_to_right_then_overrides(tmp_path):
    a = _write(tmp_path, "a.yaml", "train:\n  max_steps: 10\n  log_every: 3\ndata:\n  batch_size: 8\n")
    b = _write(tmp_path, "b.yaml", "train:\n  max_steps: 20\nrun:\n  stage: ldm\n")
    cfg = load_config([a, b], ["data.batch_size=32"])
    assert cfg.train.max_steps == 20  # b wins over a
    assert cfg.train.log_every == 3  # a kept where b is silent
    assert cfg.data.batch_size == 32  # override wins over both
    assert to_object(cfg).run.stage == Stage.LDM
    cfg = load_config([b, a])
    assert cfg.train.max_steps == 10


def test_unknown_key_in_recipe_names_key_and_closest(tmp_path):
    bad = _write(tmp_path, "bad.yaml", "train:\n  max_stpes: 10\n")
    with pytest.raises(ScldmError) as err:
        load_config([bad])
    msg = str(err.value)
    assert "bad.yaml" in msg and "train.max_stpes" in msg and "train.max_steps" in msg
    assert "\n" not in msg


def test_unknown_key_in_override(tmp_path):
    with pytest.raises(ScldmError, match=r"unknown config key 'optim\.lrr'.*'optim\.lr'"):
        load_config([], ["optim.lrr=0.1"])
    with pytest.raises(ScldmError, match="key=value"):
        load_config([], ["optim.lr"])


def test_bad_value_and_missing_recipe(tmp_path):
    with pytest.raises(ScldmError, match="train.max_steps"):
        load_config([], ["train.max_steps=many"])
    with pytest.raises(ScldmError, match="nope.yaml"):
        load_config([tmp_path / "nope.yaml"])
    with pytest.raises(ScldmError, match="zero_stage|stage"):
        load_config([], ["run.stage=diffusion"])


def test_presets_fill_fields_not_set_explicitly(tmp_path):
    from scldm_scale.nn.vae import VAE_PRESETS

    name = "vae-b"
    preset = VAE_PRESETS[name]
    cfg = load_config([], [f"vae_preset={name}", "vae.n_heads=2"])
    assert cfg.vae.n_heads == 2  # explicit beats preset
    for key, value in preset.items():
        if key != "n_heads":
            assert cfg.vae[key] == value
    with pytest.raises(ScldmError, match="vae_preset"):
        load_config([], ["vae_preset=vae-huge"])


def test_derive_fills_data_dependent_values():
    cfg = load_config([], ["flow.guidance=[2.0]"])
    derive(cfg, n_genes=123, label_cardinalities=[5, 3])
    assert cfg.vae.n_genes == 123
    assert list(cfg.dit.label_cardinalities) == [5, 3]
    assert list(cfg.flow.label_dropout) == [0.1, 0.1]
    assert list(cfg.flow.guidance) == [2.0, 2.0]
    cfg = load_config([], ["flow.label_dropout=[0.1,0.2,0.3]"])
    with pytest.raises(ScldmError, match="label_dropout"):
        derive(cfg, label_cardinalities=[5, 3])
    for bad in ("[0.8,0.3]", "[0.5,0.5]", "[-0.1,0.5]", "[0.3]"):
        cfg = load_config([], [f"flow.guidance_interval={bad}"])
        with pytest.raises(ScldmError, match=r"flow\.guidance_interval.*0 <= lo < hi <= 1"):
            derive(cfg, label_cardinalities=[5])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config([], ["train.max_steps=7"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config([tmp_path / "run" / "config.yaml"])
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)


def test_recipes_are_found_by_name_or_path(tmp_path, monkeypatch):
    from scldm_scale.config import RECIPE_DIR, recipe_names, resolve_recipe

    assert {"quickstart", "quickstart_ldm"} <= set(recipe_names())
    assert resolve_recipe("quickstart") == RECIPE_DIR / "quickstart.yaml"
    monkeypatch.chdir(tmp_path)  # outside the repository: the shipped file
    assert resolve_recipe("recipes/quickstart.yaml") == RECIPE_DIR / "quickstart.yaml"
    own = tmp_path / "quickstart.yaml"
    own.write_text("train: {max_steps: 3}\n")
    assert resolve_recipe("quickstart.yaml").resolve() == own  # an existing file wins
    assert load_config(["quickstart", str(own)]).train.max_steps == 3
    with pytest.raises(ScldmError, match="did you mean quickstart"):
        resolve_recipe("quickstrat")
