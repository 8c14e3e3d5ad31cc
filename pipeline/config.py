"""One TOML file -> a frozen dataclass tree. Every field has a docstring (the string under it).

Paths in the file are relative to the file's folder. Unknown keys, wrong types and bad values
raise ``ConfigError`` naming the setting, the value and the fix, before any work starts.

Which settings change results (and so enter the store fingerprint) is decided here, in
``result_settings``: everything else (batch sizes, devices, paths, workers) is operational.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from .errors import ConfigError

READOUTS = ("loss", "square", "mean")
METHODS = ("trak", "dtrak", "das", "das_signed")
METHOD_READOUT = {"trak": "loss", "dtrak": "square", "das": "mean", "das_signed": "mean"}
PROJECTION_KINDS = ("rademacher", "gaussian", "sjlt")
PROJECTION_BACKENDS = ("auto", "reference", "triton", "fastjl")
DTYPES = ("float32", "float64")
AUTOCAST = ("none", "bf16")
OPTIONAL_PATHS = {("store", "reports"), ("model", "lora")}
RESIDUALS = ("r", "rho")
NOISE_MODES = ("content", "common")
TIMESTEP_GRIDS = ("uniform", "centered")
# how each grid is named in the store fingerprint (uniform keeps the name stores already carry)
SCHEDULES = {"uniform": "uniform:j*(T//K)", "centered": "centered:floor((j+1/2)*T/K)"}
NONFINITE = ("error", "exclude")
ENGINES = ("dense", "factored")


@dataclass(frozen=True)
class ModelConfig:
    """One model: the [model] table, or one member of a [[model]] array of tables (an ensemble:
    several models of one recipe whose scores are averaged; ``Config.members``)."""

    path: Path = Path("base_model")
    """A diffusers pipeline folder, safetensors only: DDPMPipeline (unet/, scheduler/) or
    StableDiffusionPipeline (unet/, vae/, text_encoder/, tokenizer/, scheduler/), told apart by
    its model_index.json."""
    lora: Path | None = None
    """LoRA adapter weights for the UNet (a diffusers/peft `pytorch_lora_weights.safetensors` or
    its folder). When set, only the LoRA parameters are attributed unless [features] params says
    otherwise."""


@dataclass(frozen=True)
class DataConfig:
    train: str = "digits"
    """Training set: a .npy/.npz array (N,C,H,W), uint8 or float (see value_range), a folder of
    PNG/JPEG images (rows in sorted file-name order), or `digits` (scikit-learn's 8x8 digits). A row range may
    follow in brackets, e.g. `digits[0:400]`; samples keep their original row index as uid."""
    queries: dict[str, str] = field(default_factory=dict)
    """Query sets by name, each in the same forms as `train`. Names become store groups."""
    caption_column: str = "text"
    """Caption column of an image folder's metadata.jsonl/.csv or of a `datasets` dataset
    (text-conditioned models only)."""
    image_column: str = "image"
    """Image column of a Hugging Face `datasets` dataset saved with save_to_disk."""
    id_column: str = ""
    """Column holding stable sample ids (uids); empty: file name (folders) or row index."""
    resize: bool = False
    """Resize images (shorter side, bicubic) to the model's resolution. Never done silently:
    without it, a size mismatch is an error."""
    center_crop: bool = False
    """After resizing, center-crop to the model's square resolution (needed for non-square images)."""
    convert: str = ""
    """Images in modes other than L and RGB (RGBA, LA, P, I;16, CMYK, ...): "" refuses them,
    naming the file; "RGB" or "L" converts every image to that mode, compositing transparency on
    white and scaling 16-bit grayscale to 0..255 (rules: pipeline/data.py)."""
    value_range: str = "auto"
    """Value range of float arrays (uint8 arrays and image files are always 0..255): auto takes
    data within [-1, 1] with some values below 0 and refuses anything else, naming its min/max;
    "-1,1", "0,1" or "0,255" declare the range, mapped linearly to [-1, 1]; values outside the
    declared range are refused."""


@dataclass(frozen=True)
class FeaturesConfig:
    readouts: tuple[str, ...] = READOUTS
    """Scalar readouts whose per-sample gradients are stored: loss (TRAK), square (D-TRAK), mean (DAS)."""
    timesteps: int = 10
    """K: number of timesteps on the grid of `timestep_grid`."""
    timestep_grid: str = "uniform"
    """Where the K timesteps sit among the scheduler's T: uniform (t_j = j (T // K), j = 0..K-1:
    D-TRAK's grid, starting at t = 0) or centered (t_j = floor((j + 1/2) T / K): the midpoints of
    K equal strata, so the grid is symmetric and never uses t = 0)."""
    noise_draws: int = 1
    """S: noise draws per timestep."""
    noise: str = "common"
    """How a sample's noise is keyed: common (every sample shares the noise of (seed, t, draw):
    common random numbers) or content (a hash of its pixels and caption, with seed, t and draw:
    two different samples never share noise). Either way the noise never depends on a row index
    or a file name, and an image queried as itself gets its training features. Default measured
    (benchmarks/lds_suite): common scored 20 to 35 LDS points above content on held-out queries
    on every member, method and k."""
    seed: int = 0
    """Seed of the keyed noise."""
    normalize: bool = False
    """Divide each per-(t, draw) gradient by its L2 norm before averaging (DAS official code)."""
    dtype: str = "float32"
    """Arithmetic of the gradients and the stored features: float32, or float64 for verification."""
    batch_size: int = 16
    """Samples per vmapped gradient pass. Operational: does not change results."""
    items_per_pass: int = 0
    """(timestep, draw) pairs per pass per sample; 0 means all K*S at once. Operational."""
    vmap_chunk_size: int = 0
    """Per-sample gradients computed this many at a time inside a batch (torch.func.vmap
    chunk_size); 0 = the whole batch. Bounds peak memory. Operational."""
    params: tuple[str, ...] = ()
    """Attributed parameters: fnmatch patterns on parameter names (e.g. `*attn2*`). Empty: all
    UNet parameters, or the LoRA parameters when [model] lora is set. Only these get gradients."""
    nonfinite: str = "error"
    """What a sample whose features come out NaN or infinite does: error (stop, naming the sample;
    nothing of its unit is written) or exclude (stored as excluded: zero features, left out of the
    Gram and the scores, listed in the store and by `das status`). Operational: excluded samples
    are recorded in the store itself."""
    autocast: str = "none"
    """Forward pass precision: none, or bf16 (autocast; gradients still accumulate in float32)."""


@dataclass(frozen=True)
class ProjectionConfig:
    engine: str = "dense"
    """How features are made: dense (per-sample gradients of the attributed parameters, projected
    by the JL matrix of `kind`) or factored (per layer a Kronecker-structured projection applied to
    the layer's inputs and output gradients, so per-sample gradients are never formed; memory does
    not grow with the parameter count; pipeline/factored.py)."""
    dim: int = 2048
    """k: projection dimension."""
    seed: int = 0
    """Seed of the projection matrix (kernels/README.md)."""
    kind: str = "auto"
    """Matrix entries: rademacher (+-1/sqrt(k)), gaussian (N(0,1)/sqrt(k)) or sjlt (sparse JL:
    sjlt_nonzeros entries +-1/sqrt(s) per parameter; kernels/README.md). auto (the default) is
    resolved when the config is built: sjlt for engine = "dense" (measured on benchmarks/lds_suite:
    LDS within the bootstrap interval of rademacher on every member, 3.7-7.9x faster extraction),
    rademacher for engine = "factored" and for backend = "fastjl" (their matrices are dense)."""
    sjlt_nonzeros: int = 4
    """s, non-zeros per parameter of the sjlt matrix (must divide dim). Used only by kind = sjlt."""
    backend: str = "auto"
    """Which implementation applies the matrix: auto (Triton on CUDA, reference or the compiled
    sparse kernel on CPU), reference, triton, or fastjl (TRAK's kernel: a different, GPU-dependent
    matrix recorded as such in the fingerprint). The others are operational (same matrix)."""

    def __post_init__(self) -> None:
        if self.kind == "auto":
            dense_only = self.engine == "factored" or self.backend == "fastjl"
            object.__setattr__(self, "kind", "rademacher" if dense_only else "sjlt")


@dataclass(frozen=True)
class StoreConfig:
    path: Path = Path("runs/store.zarr")
    """The zarr v3 feature store (a folder). Created on first use, resumed afterwards."""
    rows_per_unit: int = 64
    """Samples per work unit and per zarr chunk. Fixed when a split is created."""
    reports: Path | None = None
    """Folder for human-readable outputs (top-k CSV, pictures); default: <store>.reports beside it."""


@dataclass(frozen=True)
class ScoreConfig:
    methods: tuple[str, ...] = ("trak", "dtrak", "das")
    """Methods to score: trak, dtrak, das, das_signed."""
    damping: float = 0.03
    """Damping lambda; relative unless damping_absolute is true: lambda = damping * (trace(G) minus
    its largest eigenvalue), per readout (linalg.Factor.damping_scale; docs/DESIGN.md,
    "Reduction"). Default measured on benchmarks/lds_suite (N from 128 to 1024, k from 512 to
    2048, two model sizes): one constant for every member and method, chosen on the selection
    halves; it was within 2 LDS points of the best swept damping in most cells, up to 7 below in
    the others. Sweep your own store with `das lds eval --sweep` (one factorisation)."""
    damping_absolute: bool = False
    """Read `damping` as the absolute lambda added to the Gram's diagonal."""
    gamma: float = 0.0
    """Exponent of the leave-one-out correction (1 - h_i)^gamma in das; 0 gives the official code's form.
    Default 0 measured (benchmarks/lds_digits); gamma 1 scored within 0.2 LDS points of it."""
    residual: str = "r"
    """Residual weight of das: r (RMS loss, sqrt(mean loss)) or rho (signed mean residual).
    r measured far better than rho (benchmarks/lds_digits)."""
    topk: int = 10
    """Top proponents per query written to the CSV reports."""


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The diffusion model whose training data is attributed. For an ensemble (a `[[model]]`
    list) this is its first member; code that supports ensembles reads ``members``."""
    members: tuple[ModelConfig, ...] = ()
    """The ensemble's members, in the order of the `[[model]]` array of tables (each with the
    fields of [model]): several models of one recipe (independent trainings or checkpoints) whose
    scores are averaged (pipeline/ensemble.py). Empty for a single [model] table, which keeps the
    single-model store layout and fingerprint."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training set and query sets."""
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    """Per-sample gradient features."""
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    """JL projection of the features."""
    store: StoreConfig = field(default_factory=StoreConfig)
    """Where features, reductions and scores live."""
    score: ScoreConfig = field(default_factory=ScoreConfig)
    """Reduction and scoring."""
    source: Path | None = None
    """The TOML file this config came from (None when built in code)."""

    @property
    def is_ensemble(self) -> bool:
        """True for a `[[model]]` list (even of one member)."""
        return bool(self.members)

    @property
    def reports_dir(self) -> Path:
        if self.store.reports is not None:
            return self.store.reports
        return self.store.path.with_name(self.store.path.name.removesuffix(".zarr") + ".reports")


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "features": FeaturesConfig,
    "projection": ProjectionConfig,
    "store": StoreConfig,
    "score": ScoreConfig,
}


def _fail(section: str, key: str, value: Any, fix: str) -> ConfigError:
    return ConfigError(f"[{section}] {key} = {value!r}: {fix}")


def _coerce(section: str, key: str, value: Any, default: Any, base: Path) -> Any:
    """Convert a TOML value to the type of the field's default, or raise ConfigError."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise _fail(section, key, value, "must be true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(section, key, value, "must be an integer")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(section, key, value, "must be a number")
        return float(value)
    if isinstance(default, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _fail(section, key, value, "must be a list of strings")
        return tuple(value)
    if isinstance(default, Path) or (section, key) in OPTIONAL_PATHS:
        if not isinstance(value, str):
            raise _fail(section, key, value, "must be a path string")
        path = Path(value).expanduser()
        return path if path.is_absolute() else (base / path)
    if isinstance(default, dict):
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise _fail(section, key, value, "must be a table of name = \"source\" strings")
        return {name: _resolve_source(src, base) for name, src in value.items()}
    if isinstance(default, str):
        if not isinstance(value, str):
            raise _fail(section, key, value, "must be a string")
        if (section, key) == ("data", "train"):
            return _resolve_source(value, base)
        return value
    raise AssertionError(f"no coercion for {section}.{key}")


def _resolve_source(source: str, base: Path) -> str:
    """Make a dataset source absolute unless it is a built-in name (e.g. `digits[0:10]`)."""
    name = source.split("[", 1)[0]
    if name == "digits":
        return source
    path = Path(name).expanduser()
    if not path.is_absolute():
        path = base / path
    return str(path) + source[len(name):]


def _build(cls, section: str, table: dict, base: Path):
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in table.items():
        if key not in known:
            raise ConfigError(f"[{section}] {key}: unknown setting; known settings are "
                              f"{', '.join(sorted(known))}")
        default = known[key].default
        if default is dataclasses.MISSING:
            default = known[key].default_factory()
        kwargs[key] = _coerce(section, key, value, default, base)
    return cls(**kwargs)


def _members(model, base: Path) -> tuple[ModelConfig, ...]:
    """The `[[model]]` array of tables as ModelConfigs (empty for a single [model] table)."""
    if not isinstance(model, list):
        return ()
    if not model:
        raise ConfigError("[[model]] is an empty list: give at least one member with a path, or "
                          "use a single [model] table")
    members = []
    for i, table in enumerate(model):
        if not isinstance(table, dict):
            raise ConfigError(f"[[model]] member {i} must be a table with path (and lora), got "
                              f"{table!r}")
        if "path" not in table:
            raise ConfigError(f"[[model]] member {i}: path is missing: set it to that member's "
                              f"diffusers pipeline folder")
        try:
            members.append(_build(ModelConfig, "model", table, base))
        except ConfigError as err:
            raise ConfigError(f"[[model]] member {i}: {err}") from None
    return tuple(members)


def from_dict(raw: dict, base: Path = Path("."), source: Path | None = None) -> Config:
    """Build and validate a Config from a parsed TOML table; paths resolve against ``base``."""
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section(s) [{'], ['.join(unknown)}]; known sections are "
                          f"[{'], ['.join(SECTIONS)}]")
    parts = {}
    members = _members(raw.get("model", {}), base)
    for section, cls in SECTIONS.items():
        table = raw.get(section, {})
        if section == "model" and members:
            parts[section] = members[0]
            continue
        if not isinstance(table, dict):
            raise ConfigError(f"[{section}] must be a table, got {table!r}")
        parts[section] = _build(cls, section, table, base)
    if not members and "path" not in raw.get("model", {}):
        raise ConfigError("[model] path is missing: set it to a diffusers pipeline folder "
                          "(unet/ and scheduler/), e.g. path = \"base_model\"")
    parts["members"] = members
    if "path" not in raw.get("store", {}):
        raise ConfigError("[store] path is missing: set it to the zarr store folder, "
                          "e.g. path = \"runs/features.zarr\"")
    cfg = Config(**parts, source=source)
    validate(cfg)
    return cfg


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass the path of a TOML file")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {err}") from None
    return from_dict(raw, base=path.resolve().parent, source=path.resolve())


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as a TOML value")


def dump_toml(raw: dict) -> str:
    """TOML text of a config table (sections of scalars, lists, sub-tables and arrays of tables
    such as [[model]]), for writing
    configs from code: ``load_config`` of the result gives back ``raw``."""
    lines: list[str] = []

    def is_tables(v) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(t, dict) for t in v)

    def table(name: str, values: dict, header: str = "[{}]") -> None:
        scalars = {k: v for k, v in values.items() if not isinstance(v, dict) and not is_tables(v)}
        if name:
            lines.extend(["", header.format(name)])
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in scalars.items())
        for key, sub in values.items():
            full = f"{name}.{key}" if name else key
            if isinstance(sub, dict):
                table(full, sub)
            elif is_tables(sub):  # an array of tables, e.g. [[model]] (an ensemble)
                for item in sub:
                    table(full, item, "[[{}]]")

    table("", raw)
    return "\n".join(lines).lstrip() + "\n"


def merge(raw: dict, overrides: dict) -> dict:
    """A copy of ``raw`` with ``overrides`` applied table by table (sub-tables merged, others replaced)."""
    out = dict(raw)
    for key, value in overrides.items():
        out[key] = merge(out.get(key, {}), value) if isinstance(value, dict) and \
            isinstance(out.get(key), dict) else value
    return out


def _check_list(section: str, key: str, values, allowed, what: str) -> None:
    if not values:
        raise _fail(section, key, list(values), f"list at least one of {allowed}")
    for v in values:
        if v not in allowed:
            raise _fail(section, key, list(values), f"unknown {what} {v!r}; choose from {allowed}")


def validate(cfg: Config) -> None:
    """Check values that types alone do not catch; raise ConfigError with the fix."""
    f, p, s, st = cfg.features, cfg.projection, cfg.score, cfg.store
    _check_list("features", "readouts", f.readouts, READOUTS, "readout")
    if len(set(f.readouts)) != len(f.readouts):
        raise _fail("features", "readouts", list(f.readouts), "list each readout once")
    for key in ("timesteps", "noise_draws", "batch_size"):
        if getattr(f, key) < 1:
            raise _fail("features", key, getattr(f, key), "must be >= 1")
    if f.items_per_pass < 0:
        raise _fail("features", "items_per_pass", f.items_per_pass, "must be >= 0 (0 = all)")
    if f.seed < 0:
        raise _fail("features", "seed", f.seed, "must be >= 0")
    if f.nonfinite not in NONFINITE:
        raise _fail("features", "nonfinite", f.nonfinite, f"choose one of {NONFINITE}")
    if f.timestep_grid not in TIMESTEP_GRIDS:
        raise _fail("features", "timestep_grid", f.timestep_grid, f"choose one of {TIMESTEP_GRIDS}")
    if f.noise not in NOISE_MODES:
        raise _fail("features", "noise", f.noise, f"choose one of {NOISE_MODES}")
    if f.dtype not in DTYPES:
        raise _fail("features", "dtype", f.dtype, f"choose one of {DTYPES}")
    if f.autocast not in AUTOCAST:
        raise _fail("features", "autocast", f.autocast, f"choose one of {AUTOCAST}")
    if f.autocast != "none" and f.dtype != "float32":
        raise _fail("features", "autocast", f.autocast, "needs dtype = \"float32\"")
    if f.vmap_chunk_size < 0:
        raise _fail("features", "vmap_chunk_size", f.vmap_chunk_size, "must be >= 0 (0 = whole batch)")
    if cfg.data.center_crop and not cfg.data.resize:
        raise _fail("data", "center_crop", True, "needs resize = true (crop follows the resize)")
    if cfg.data.convert not in ("", "RGB", "L"):
        raise _fail("data", "convert", cfg.data.convert,
                    "choose \"RGB\" or \"L\" (convert other image modes), or \"\" (refuse them)")
    if cfg.data.value_range not in ("auto", "-1,1", "0,1", "0,255"):
        raise _fail("data", "value_range", cfg.data.value_range, "choose \"auto\", \"-1,1\", "
                    "\"0,1\" or \"0,255\" (the range float arrays were saved in)")
    if p.dim < 1:
        raise _fail("projection", "dim", p.dim, "must be >= 1 (typical: 2048 to 32768)")
    if not 0 <= p.seed < 2**64:
        raise _fail("projection", "seed", p.seed, "must be in [0, 2**64)")
    if p.engine not in ENGINES:
        raise _fail("projection", "engine", p.engine, f"choose one of {ENGINES}")
    if p.engine == "factored":
        if p.kind == "sjlt":
            raise _fail("projection", "kind", p.kind, "the factored engine's per-layer factors are "
                        "dense: use rademacher or gaussian (sjlt is for engine = \"dense\")")
        if f.autocast != "none":
            raise _fail("features", "autocast", f.autocast, "the factored engine runs without "
                        "autocast: set autocast = \"none\" or engine = \"dense\"")
    if p.kind not in PROJECTION_KINDS:
        raise _fail("projection", "kind", p.kind, f"choose auto or one of {PROJECTION_KINDS}")
    if p.backend not in PROJECTION_BACKENDS:
        raise _fail("projection", "backend", p.backend, f"choose one of {PROJECTION_BACKENDS}")
    if p.kind == "sjlt" and (p.sjlt_nonzeros < 1 or p.dim % p.sjlt_nonzeros):
        raise _fail("projection", "sjlt_nonzeros", p.sjlt_nonzeros,
                    f"must be >= 1 and divide dim = {p.dim} (typical: 4)")
    if p.backend == "fastjl" and (p.dim % 512 or p.kind == "sjlt"):
        raise _fail("projection", "backend", p.backend,
                    f"fast-jl needs kind rademacher or gaussian and dim a multiple of 512 (kind = "
                    f"{p.kind!r}, dim = {p.dim}); use backend = \"auto\"")
    if st.rows_per_unit < 1:
        raise _fail("store", "rows_per_unit", st.rows_per_unit, "must be >= 1 (typical: 64)")
    _check_list("score", "methods", s.methods, METHODS, "method")
    for m in s.methods:
        if METHOD_READOUT[m] not in f.readouts:
            raise _fail("score", "methods", list(s.methods),
                        f"method {m!r} needs readout {METHOD_READOUT[m]!r}; add it to "
                        f"[features] readouts")
    if not s.damping > 0:
        raise _fail("score", "damping", s.damping, "must be > 0 (relative default 0.03)")
    if s.residual not in RESIDUALS:
        raise _fail("score", "residual", s.residual, f"choose one of {RESIDUALS}")
    if s.topk < 1:
        raise _fail("score", "topk", s.topk, "must be >= 1")
    for name in cfg.data.queries:
        if not name or not name.replace("_", "").replace("-", "").isalnum() or name == "train":
            raise _fail("data.queries", name, cfg.data.queries[name],
                        "query set names must be letters, digits, '-' or '_', and not 'train'")


def result_settings(cfg: Config) -> dict:
    """The settings that change stored features; they enter the store fingerprint.

    Batch sizes, backend, paths and score settings are left out on purpose: they do not change
    the features (score settings are recorded beside the scores instead).
    """
    f, p = cfg.features, cfg.projection
    return {
        "readouts": list(f.readouts),
        "timesteps": f.timesteps,
        "schedule": SCHEDULES[f.timestep_grid],
        "noise_draws": f.noise_draws,
        "noise_seed": f.seed,
        "noise": f.noise,
        "noise_rng": "torch.Generator(cpu).randn keyed by blake2b(seed|key|t|draw), key = "
                     "sha256(float32 pixels, caption)[:32] (content) or 'common'",
        "normalize": f.normalize,
        "dtype": f.dtype,
        "autocast": f.autocast,
        "params": list(f.params),
        "transform": {"resize": cfg.data.resize, "center_crop": cfg.data.center_crop,
                      "convert": cfg.data.convert, "value_range": cfg.data.value_range},
        "projection": {"kind": p.kind, "dim": p.dim, "seed": p.seed,
                       **({"nonzeros": p.sjlt_nonzeros} if p.kind == "sjlt" else {}),
                       **({"engine": p.engine} if p.engine != "dense" else {})},
    }
