"""Where things live in a workspace (a folder holding manifests/, cache/ and leakpipe.toml)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from leakpipe.pipeline.store import storage
from leakpipe.pipeline.config import DEFAULT_PROFILE, Config
from leakpipe.pipeline.config_files import load_config


@dataclass
class Workspace:
    root: Path

    def __post_init__(self):
        self.root = Path(self.root).resolve()

    @property
    def manifests(self) -> Path:
        return self.root / "manifests"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def hash_cache(self) -> Path:
        return self.cache / "file-hashes.sqlite"  # file-hashes.json before; migrated once

    def manifest(self, split: str) -> Path:
        from leakpipe.pipeline.manifest import check_name

        return self.manifests / f"{check_name(split)}.csv"

    def latents_dir(self, split: str) -> Path:
        return self.cache / "latents" / split

    def stores_root(self, url: str = "") -> str:
        """Where latent stores go: cache/latents/, or `url` (store.url); a relative folder is
        relative to the workspace, as manifests are."""
        if not url:
            return str(self.cache / "latents")
        return url if storage.is_url(url) else str(self.root / Path(url).expanduser())

    def latent_store(self, split: str, encoder_fp: str, url: str = "") -> str:
        return storage.join(self.stores_root(url), split, f"{encoder_fp[:12]}.zarr")

    def store_lock(self, split: str, encoder_fp: str, kind: str = "lock.json") -> Path:
        """The store's lock file (or writer lock): always local, next to where a local store goes."""
        return self.latents_dir(split) / f"{encoder_fp[:12]}.{kind}"

    def failures_csv(self, split: str) -> Path:
        return self.cache / "latents" / f"{split}.failures.csv"

    def splits(self) -> list[str]:
        return sorted(p.stem for p in self.manifests.glob("*.csv"))

    def config(self, config_file: Path | None = None, overrides=(), profile: str = DEFAULT_PROFILE) -> Config:
        if config_file is None and (self.root / "leakpipe.toml").exists():
            config_file = self.root / "leakpipe.toml"
        return load_config(config_file, overrides, profile)
