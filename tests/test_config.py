import pytest

from leakpipe.pipeline.config import Config, ConfigError, canonical_hash, load_config, section_hash


def test_defaults_follow_the_spec():
    cfg = Config()
    assert cfg.vae.source == "stabilityai/stable-diffusion-2-1-base" and cfg.vae.subfolder == "vae"
    assert cfg.preprocess.size == 256 and cfg.store.chunk_rows == 64 and cfg.store.dtype == "float32"


def test_toml_then_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[preprocess]\nsize = 128\n[encode]\nbatch_size = 4\n')
    cfg = load_config(f, ["encode.batch_size=9", "vae.dtype=float16"])
    assert cfg.preprocess.size == 128 and cfg.encode.batch_size == 9 and cfg.vae.dtype == "float16"


@pytest.mark.parametrize("key, says", [
    ("vae.sourse", "did you mean vae.source?"), ("train.epoch", "did you mean train.epochs?"),
    ("epochs", "did you mean train.epochs?"), ("trian.lr", "did you mean train.lr?"),
    ("model.zzz", "the keys of [model] are backbone, init"), ("foo.bar", "sections: vae, preprocess")])
def test_unknown_key_suggests_the_nearest(key, says):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{key}=x"])
    assert repr(key) in str(err.value) and says in str(err.value) and "`leakpipe config`" in str(err.value)
    assert len(str(err.value)) < 300  # a suggestion, not every key


@pytest.mark.parametrize("item, words", [
    ("preprocess.size=big", "expected int"),
    ("vae.dtype=float64", "not one of"),
    ("store.chunk_rows", "key=value"),
    ("preprocess.size=1.5", "expected int"),
])
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
