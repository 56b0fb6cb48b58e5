import pytest

from leakpipe.pipeline.config import Config, ConfigError, canonical_hash, section_hash
from leakpipe.pipeline.config_files import load_config


def test_defaults_follow_the_spec():
    cfg = Config()
    assert cfg.vae.source == "stabilityai/stable-diffusion-2-1-base" and cfg.vae.subfolder == "vae"
    assert cfg.preprocess.size == 256 and cfg.store.chunk_rows == 64 and cfg.store.dtype == "float32"


def test_toml_then_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[preprocess]\nsize = 128\n[encode]\nbatch_size = 4\n")
    cfg = load_config(f, ["encode.batch_size=9", "vae.dtype=float16"])
    assert cfg.preprocess.size == 128 and cfg.encode.batch_size == 9 and cfg.vae.dtype == "float16"


@pytest.mark.parametrize(
    "key, says",
    [
        ("vae.sourse", "did you mean vae.source?"),
        ("train.epoch", "did you mean train.epochs?"),
        ("epochs", "did you mean train.epochs?"),
        ("trian.lr", "did you mean train.lr?"),
        ("model.zzz", "the keys of [model] are backbone, init"),
        ("foo.bar", "sections: vae, preprocess"),
    ],
)
def test_unknown_key_suggests_the_nearest(key, says):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{key}=x"])
    assert repr(key) in str(err.value) and says in str(err.value) and "`leakpipe config`" in str(err.value)
    assert len(str(err.value)) < 300  # a suggestion, not every key


@pytest.mark.parametrize(
    "item, words",
    [
        ("preprocess.size=big", "expected int"),
        ("vae.dtype=float64", "not one of"),
        ("store.chunk_rows", "key=value"),
        ("preprocess.size=1.5", "expected int"),
    ],
)
def test_type_and_choice_errors(item, words):
    with pytest.raises(ConfigError, match=words):
        load_config(None, [item])


def test_bad_toml_names_the_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[vae\nsource=1")
    with pytest.raises(ConfigError, match="c.toml"):
        load_config(f)
    f.write_text("[vae]\nsource = 3\n")
    with pytest.raises(ConfigError, match="vae.source: expected str"):
        load_config(f)


def test_canonical_hash_is_order_free_and_sensitive():
    assert canonical_hash({"a": 1, "b": [1, 2]}) == canonical_hash({"b": [1, 2], "a": 1})
    a, b = Config(), load_config(None, ["preprocess.size=128"])
    assert section_hash(a, "vae") == section_hash(b, "vae")
    assert section_hash(a, "preprocess") != section_hash(b, "preprocess")
    assert canonical_hash(a.to_dict()) != canonical_hash(b.to_dict())


def test_a_config_is_immutable_and_changed_only_through_the_loader():
    import dataclasses

    from leakpipe.pipeline.config_files import with_overrides

    cfg = load_config(None, ["train.epochs=3"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 5
    more = with_overrides(cfg, ["train.epochs=7"])
    assert (cfg.train.epochs, more.train.epochs) == (3, 7)  # a new config; the old one unchanged
    with pytest.raises(ConfigError, match="train.epochs = 0: must be >= 1"):
        with_overrides(cfg, ["train.epochs=0"])  # validated like --set


def test_a_stored_config_is_rebuilt_typed_and_validated():
    """A result's config.json goes through the same loader: types and ranges are checked, and keys
    added since it was written take their earlier defaults (what the result was trained with)."""
    from leakpipe.pipeline.config import ADDED_KEYS
    from leakpipe.pipeline.config_files import from_dict

    stored = load_config(None, ["model.embed_dim=16"]).to_dict()
    del stored["model"]["stem"]  # written before model.stem existed
    got = from_dict(stored)
    assert got.model.embed_dim == 16 and got.model.stem == ADDED_KEYS["model.stem"] == "imagenet"
    stored["train"]["epochs"] = "many"
    with pytest.raises(ConfigError, match="train.epochs: expected int"):
        from_dict(stored, "results/x/config.json")
    with pytest.raises(ConfigError, match="unknown setting 'train.nope'"):
        from_dict({"train": {"nope": 1}})


def test_a_retired_key_names_its_replacement_and_stored_configs_still_load():
    """score.unseen_tpr became score.alpha: --set and TOML files say so; a result's or an export's
    config.json written with it still loads (the key dropped)."""
    from leakpipe.pipeline.config_files import from_dict

    with pytest.raises(ConfigError, match="score.unseen_tpr was replaced by score.alpha"):
        load_config(None, ["score.unseen_tpr=0.9"])
    stored = Config().to_dict()
    stored["score"]["unseen_tpr"] = 0.95
    assert from_dict(stored).score.alpha == 0.1
    stored["score"]["maha_covariance"] = "shared"  # a result trained at commit 3d0bc00 stored it
    assert from_dict(stored).score.maha_shared == 0.5
    with pytest.raises(ConfigError, match="score.maha_covariance was replaced by score.maha_shared"):
        load_config(None, ["score.maha_covariance=shared"])
    for bad in ("0", "1", "1.5"):
        with pytest.raises(ConfigError, match="score.alpha .*: must be between 0 and 1, both excluded"):
            load_config(None, [f"score.alpha={bad}"])
    assert (
        load_config(
            None,
            ["score.alpha=0.05", "score.conformal=aps", "score.mondrian=true", "score.calibration=class_temperature"],
        ).score.conformal
        == "aps"
    )
    with pytest.raises(ConfigError, match="score.calibration: 'zscore' is not one of temperature"):
        load_config(None, ["score.calibration=zscore"])
