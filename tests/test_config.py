"""Config loading, validation messages and the fingerprint's scope."""

import dataclasses
from pathlib import Path

import pytest

from das_pipeline.config import Config, ConfigError, load_config, result_settings

ISSUE_EXAMPLE = """
[model]
path = "base_model"            # a diffusers pipeline folder: unet/ and scheduler/ (DDPMPipeline layout)

[data]
train = "data/train.npy"       # .npy/.npz array (N,C,H,W) in [-1,1] or uint8, or a folder of images
[data.queries]
val = "data/val.npy"
gen = "data/gen_png"           # a folder of PNG/JPEG images, rows in sorted file-name order

[features]
readouts = ["loss", "square", "mean"]
timesteps = 10
noise_draws = 1
seed = 0

[projection]
dim = 2048
seed = 0

[store]
path = "runs/digits.zarr"

[score]
methods = ["trak", "dtrak", "das"]
damping = 0.01                 # relative: lambda = damping * (trace(G) - top eigenvalue)
topk = 10
"""


def test_issue_example_is_accepted_with_paths_relative_to_the_file(tmp_path):
    path = tmp_path / "sub" / "digits.toml"
    path.parent.mkdir()
    path.write_text(ISSUE_EXAMPLE)
    cfg = load_config(path)
    base = path.parent.resolve()
    assert cfg.model.path == base / "base_model"
    assert cfg.data.train == str(base / "data/train.npy")
    assert cfg.data.queries == {"val": str(base / "data/val.npy"), "gen": str(base / "data/gen_png")}
    assert cfg.store.path == base / "runs/digits.zarr"
    assert cfg.features.readouts == ("loss", "square", "mean")
    assert cfg.projection.dim == 2048 and cfg.score.topk == 10 and cfg.score.damping == 0.01
    assert cfg.reports_dir == base / "runs/digits.reports"


def test_every_field_has_a_docstring():
    import ast
    import inspect

    import das_pipeline.config as module

    tree = ast.parse(inspect.getsource(module))
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name.endswith("Config"):
            body = node.body
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.AnnAssign):
                    nxt = body[i + 1] if i + 1 < len(body) else None
                    assert isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant), (
                        f"{node.name}.{stmt.target.id} has no docstring")


@pytest.mark.parametrize("old, new, words", [
    ("dim = 2048", "dim = 0", ["[projection] dim = 0", ">= 1"]),
    ('readouts = ["loss", "square", "mean"]', 'readouts = ["loss", "gradnorm"]',
     ["[features] readouts", "'gradnorm'", "choose from"]),
    ('methods = ["trak", "dtrak", "das"]', 'methods = ["trak", "magic"]',
     ["[score] methods", "'magic'", "choose from"]),
    ("timesteps = 10", "timesteps = 0", ["[features] timesteps = 0", ">= 1"]),
    ("timesteps = 10", 'timesteps = "ten"', ["[features] timesteps = 'ten'", "integer"]),
    ("timesteps = 10", "batchsize = 4", ["[features] batchsize", "unknown setting", "batch_size"]),
    ("damping = 0.01 ", "damping = -1.0 ", ["[score] damping = -1.0", "> 0"]),
    ("[store]", "[stroe]", ["unknown section", "[stroe]"]),
])
def test_bad_values_name_setting_value_and_fix(tmp_path, old, new, words):
    assert old in ISSUE_EXAMPLE
    path = tmp_path / "c.toml"
    path.write_text(ISSUE_EXAMPLE.replace(old, new, 1))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    for word in words:
        assert word in str(err.value)


def test_method_needs_its_readout(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(ISSUE_EXAMPLE.replace('readouts = ["loss", "square", "mean"]', 'readouts = ["loss"]'))
    with pytest.raises(ConfigError, match="method 'dtrak' needs readout 'square'"):
        load_config(path)


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\npath=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_fingerprint_covers_exactly_the_result_affecting_settings():
    base = Config(source=Path("x"))
    same = [("features", "batch_size", 3), ("features", "items_per_pass", 2),
            ("projection", "backend", "reference"), ("store", "rows_per_unit", 7),
            ("store", "path", Path("elsewhere.zarr")), ("score", "damping", 0.5),
            ("score", "topk", 3), ("model", "path", Path("other"))]
    changed = [("features", "timesteps", 20), ("features", "noise_draws", 2), ("features", "seed", 1),
               ("features", "normalize", True), ("features", "readouts", ("loss",)),
               ("features", "dtype", "float64"), ("projection", "dim", 512),
               ("projection", "seed", 3), ("projection", "kind", "gaussian"),
               ("features", "noise", "content")]

    def with_(section, key, value):
        part = dataclasses.replace(getattr(base, section), **{key: value})
        return dataclasses.replace(base, **{section: part})

    for section, key, value in same:
        assert result_settings(with_(section, key, value)) == result_settings(base), key
    for section, key, value in changed:
        assert result_settings(with_(section, key, value)) != result_settings(base), key
