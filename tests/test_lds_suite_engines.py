"""benchmarks/lds_suite: write_config's engine and seed (engines.py's stores) and the plan.

- the suite's existing configs are unchanged: no engine key for the dense engine, the default
  projection seed 0, the same store names;
- a factored / seeded config loads with that engine, kind and seed, under the documented name;
- factored with a kind other than rademacher is refused before anything is written;
- engines.plan lists both engines per seed at k and both at scale x k.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import tomllib

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "lds_suite"))

import engines  # noqa: E402
import run  # noqa: E402

from das_pipeline.config import load_config  # noqa: E402

MEMBER, COMMON = run.MINI_MEMBERS["mini40"], run.MINI_COMMON


def test_existing_configs_unchanged(tmp_path):
    sjlt = run.write_config(tmp_path, MEMBER, COMMON, "common", "sjlt")
    big = run.write_config(tmp_path, MEMBER, COMMON, "common", dim=128)
    assert (sjlt.stem, big.stem) == ("common_sjlt", "common_dim128")
    proj = tomllib.loads(sjlt.read_text())["projection"]
    assert proj == {"dim": 64, "seed": 0, "kind": "sjlt"}
    cfg = load_config(sjlt)
    assert (cfg.projection.engine, cfg.projection.kind, cfg.projection.seed) == ("dense", "sjlt", 0)


def test_factored_and_seeded_configs(tmp_path):
    fac = run.write_config(tmp_path, MEMBER, COMMON, "common", engine="factored", seed=1)
    assert fac.stem == "common_factored_seed1"
    cfg = load_config(fac)
    assert (cfg.projection.engine, cfg.projection.kind, cfg.projection.seed) == ("factored", "rademacher", 1)
    assert cfg.store.path.name == "common_factored_seed1.zarr"
    big = run.write_config(tmp_path, MEMBER, COMMON, "common", engine="factored", dim=256)
    assert big.stem == "common_factored_dim256"
    dense = run.write_config(tmp_path, MEMBER, COMMON, "common", "sjlt", seed=2)
    assert dense.stem == "common_sjlt_seed2" and load_config(dense).projection.seed == 2


def test_factored_sjlt_refused(tmp_path):
    with pytest.raises(ValueError, match="factored"):
        run.write_config(tmp_path, MEMBER, COMMON, "common", "sjlt", engine="factored")
    assert not list(tmp_path.iterdir())


def test_plan(tmp_path):
    stores = [engines.store_config(tmp_path, MEMBER, COMMON, st).stem
              for st in engines.plan(MEMBER, [0, 1], 4)]
    assert stores == ["common_sjlt", "common_factored", "common_sjlt_seed1", "common_factored_seed1",
                      "common_sjlt_dim256", "common_factored_dim256"]
    assert len(engines.plan(MEMBER, [0], 1)) == 2
    seeded = [engines.store_config(tmp_path, MEMBER, COMMON, st).stem
              for st in engines.plan(MEMBER, [0, 1], 4, scale_seeds=True)[4:]]
    assert seeded == ["common_sjlt_dim256", "common_factored_dim256", "common_sjlt_dim256_seed1",
                      "common_factored_dim256_seed1"]
