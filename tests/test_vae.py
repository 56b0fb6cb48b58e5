import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from leakpipe.pipeline.config import VaeConfig
from leakpipe.pipeline.config_files import load_config, with_overrides
from leakpipe.stages import STAGES
from leakpipe.pipeline.store.hashing import HashCache
from leakpipe.pipeline.engine.vae import VaeError, encoder_fingerprint, load_vae, model_config, resolve, save_random_vae


def _encode(vae, x):
    with torch.no_grad():
        return vae.encode(x).latent_dist.mean


def test_folder_and_single_file_give_the_same_model(tiny_vae, tmp_path):
    folder = load_vae(resolve(VaeConfig(source=str(tiny_vae))))
    single = tmp_path / "vae.safetensors"
    save_file(folder.state_dict(), single)
    src = resolve(VaeConfig(source=str(single), config=str(tiny_vae / "config.json")))
    assert src.kind == "single_file"
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(_encode(folder, x), _encode(load_vae(src), x))
    assert not any(p.requires_grad for p in folder.parameters()) and not folder.training


def test_pipeline_folder_with_vae_subfolder(tiny_vae, tmp_path):
    import shutil

    shutil.copytree(tiny_vae, tmp_path / "pipe" / "vae")
    assert resolve(VaeConfig(source=str(tmp_path / "pipe"))).location == tmp_path / "pipe" / "vae"


def test_offline_hub_id_gives_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(VaeError, match="not in the local Hugging Face cache.*--vae PATH"):
        resolve(VaeConfig(source="stabilityai/stable-diffusion-2-1-base"))


def test_pickle_and_missing_sources_are_refused(tmp_path):
    (tmp_path / "vae.ckpt").write_bytes(b"x")
    with pytest.raises(VaeError, match="never loads pickle"):
        resolve(VaeConfig(source=str(tmp_path / "vae.ckpt")))
    with pytest.raises(VaeError, match="does not exist"):
        resolve(VaeConfig(source="./nowhere/vae"))


def test_a_missing_local_path_is_never_looked_up_on_the_hub(tmp_path, monkeypatch):
    """An exported attributor used to record `vae` (workspace-relative): from elsewhere it was read as a
    Hub id ("not in the local Hugging Face cache"). A Hub id is exactly owner/name; the rest is local."""
    from leakpipe.pipeline.engine import vae as vae_lib

    looked_up = []
    monkeypatch.setattr(vae_lib, "_resolve_hub", lambda cfg: looked_up.append(cfg.source))
    for source in ("vae", "./vae", "../models/vae", "a/b/c", "~/vae", "vae.safetensors", "owner/vae.safetensors"):
        with pytest.raises(VaeError, match=r"^missing local path: VAE source .* does not exist") as err:
            resolve(VaeConfig(source=source), tmp_path)
        assert "Hugging Face" not in str(err.value)
    with pytest.raises(VaeError, match=re.escape(f"looked for {tmp_path / 'vae'}")):
        resolve(VaeConfig(source="vae"), tmp_path)
    assert not looked_up
    resolve(VaeConfig(source="stabilityai/sd-vae-ft-mse"), tmp_path)
    assert looked_up == ["stabilityai/sd-vae-ft-mse"]


def test_fingerprint_tracks_weights_config_and_preprocessing(tiny_vae, tmp_path):
    hashes = HashCache(tmp_path / "h.json")
    code = STAGES["encode"].code_identity()
    cfg = load_config(None, [f"vae.source={tiny_vae}"])
    base = encoder_fingerprint(cfg, resolve(cfg.vae), hashes, code)
    other = save_random_vae(tmp_path / "other", (8, 16), seed=1)
    cfg2 = with_overrides(cfg, [f"vae.source={other}"])
    assert encoder_fingerprint(cfg2, resolve(cfg2.vae), hashes, code) != base
    small = with_overrides(cfg, ["preprocess.size=64"])
    assert encoder_fingerprint(small, resolve(small.vae), hashes, code) != base
    from leakpipe.pipeline.ledger.code import identity

    other_code = {**identity(STAGES["encode"].code), "another entry": "0"}  # the label's code, one entry more
    assert encoder_fingerprint(cfg, resolve(cfg.vae), hashes, other_code) != base
    run = with_overrides(cfg, ["encode.batch_size=99"])  # execution only
    assert encoder_fingerprint(run, resolve(run.vae), hashes, code) == base


def test_full_sd21_architecture_gives_4x32x32(tmp_path):
    folder = save_random_vae(tmp_path / "sd21", (128, 256, 512, 512), norm_num_groups=32, layers_per_block=2)
    cfg = json.loads((folder / "config.json").read_text())
    packaged = json.loads((resolve(VaeConfig(source=str(folder))).config_path).read_text())
    assert cfg["block_out_channels"] == [128, 256, 512, 512] == packaged["block_out_channels"]
    vae = load_vae(resolve(VaeConfig(source=str(folder))))
    n_encoder = sum(p.numel() for p in vae.encoder.parameters()) + sum(p.numel() for p in vae.quant_conv.parameters())
    assert 34_000_000 < n_encoder < 35_000_000  # SD2.1's encoder has 34.2 M parameters
    post = vae.encode(torch.zeros(1, 3, 256, 256)).latent_dist
    assert post.mean.shape == (1, 4, 32, 32) and post.logvar.shape == (1, 4, 32, 32)


# ---------------------------------------------------------------- the autoencoder shipped with leakpipe
def _photo(size: int = 128) -> torch.Tensor:
    """A natural photo (scikit-learn's sample, shipped with it) in [-1, 1], (1, 3, size, size)."""
    from sklearn.datasets import load_sample_image

    img = np.array(load_sample_image("flower.jpg")[100 : 100 + size, 150 : 150 + size])
    return torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1


def _psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(10 * torch.log10(4 / (x - y.clamp(-1, 1)).pow(2).mean()))


def test_taef2_ships_loads_strictly_and_reconstructs_a_photo():
    """The shipped TAEF2 loads strictly into the plain-torch TAESD layout (mid-block pool included), gives
    32 channels at 1/8 of the side and reconstructs a natural photo well; the same layout with random
    weights does not (the check can fail)."""
    from leakpipe.pipeline.engine.autoencoders import load_autoencoder
    from leakpipe.pipeline.nn.taesd import TinyAutoencoder

    src = resolve(VaeConfig(source="builtin:taef2"))
    assert (src.kind, src.family, src.label) == ("builtin", "taesd", "builtin:taef2") and src.decoder.is_file()
    assert model_config(src)["latent_channels"] == 32 and model_config(src)["mid_block_pool"]
    model = load_autoencoder(src)
    x = _photo()
    with torch.no_grad():
        z = model.encode(x).latent_dist.mean
        assert z.shape == (1, 32, 16, 16)
        assert _psnr(x, model.decode(z)) > 25
        torch.manual_seed(0)
        assert _psnr(x, TinyAutoencoder(32, True).eval().decode(z)) < 12
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_shipped_weights_are_refused_when_their_sha256_differs(tmp_path, monkeypatch):
    """A flipped byte in a copy of the shipped weights is refused with what to do; the intact copy loads."""
    import shutil

    from leakpipe.pipeline.engine import vae_files
    from leakpipe.pipeline.engine.autoencoders import load_autoencoder, load_encoder

    shutil.copytree(vae_files.ASSETS, tmp_path / "assets")
    monkeypatch.setattr(vae_files, "ASSETS", tmp_path / "assets")
    load_autoencoder(resolve(VaeConfig(source="builtin:taef2")))
    weights = tmp_path / "assets" / "taef2" / "taef2_encoder.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(VaeError, match=r"taef2_encoder.safetensors has SHA-256 .* Reinstall leakpipe"):
        load_encoder(resolve(VaeConfig(source="builtin:taef2")))
    with pytest.raises(VaeError, match="no such autoencoder ships with leakpipe"):
        resolve(VaeConfig(source="builtin:taef9"))


def test_shipped_sha256sums_match_the_code_and_the_conversion(tmp_path):
    """SHA256SUMS beside the weights lists what the code pins; converting the originals (when the shared
    copy is at hand) gives the shipped bytes again, and the originals' hashes are the recorded ones."""
    from pathlib import Path

    from leakpipe.pipeline.engine import vae_files

    item = vae_files.BUILTINS["taef2"]
    sums = dict(line.split()[::-1] for line in (item.folder / "SHA256SUMS").read_text().splitlines())
    assert {k: sums[k] for k in item.sha256} == item.sha256
    assert {k: vae_files.sha256(item.folder / k) for k in item.sha256} == item.sha256
    assert (item.folder / "LICENSE").read_text().startswith("MIT License")
    originals = Path(__file__).resolve().parent.parent.parent / "shared" / "assets" / "taef2"
    if not originals.is_dir():
        pytest.skip("the original .pth files are not at hand")
    for name in item.sha256:
        pth = originals / name.replace(".safetensors", ".pth")
        assert vae_files.sha256(pth) == sums[pth.name]
        vae_files.convert_pth(pth, tmp_path / name)
        assert vae_files.sha256(tmp_path / name) == item.sha256[name]
