"""Errors a user can make in `config.train`, `config.checkpoint` and `config.mesh`, raised before
anything is built or compiled, each in one sentence that names the field and the fix.

`check_config(config)` needs the config alone: every count and size in its range, the schedule's
fields consistent with each other, and the model's fields (`heft.model.checks`). `heft` runs it as
soon as `--config` is parsed, so every verb refuses a bad config before doing any work.
`check(config, mesh)` adds what depends on the devices (the batch over the mesh, every parameter's
divisibility); the training loop runs it before compiling.
"""

from heft.model import checks as model_checks
from heft.model import kernels
from heft.model.checks import ConfigError
from heft.train import experts, rules, sharding

SCHEDULES = ("cosine", "linear", "constant")
ON_NONFINITE = ("stop", "skip")
MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Integer fields: (section, field) -> (least value, what it counts).
COUNTS = {
    ("train", "steps"): (1, "optimizer updates"),
    ("train", "batch_size"): (1, "sequences per step, over all processes"),
    ("train", "seq_len"): (1, "tokens per sequence"),
    ("train", "target_len"): (0, "an encoder-decoder's decoder row; 0 picks it from the data"),
    ("train", "micro_batches"): (1, "gradient-accumulation pieces of the batch"),
    ("train", "warmup_steps"): (0, "steps of linear warmup"),
    ("train", "seed"): (0, "the parameter-init seed"),
    ("train", "log_every"): (1, "steps between metric lines"),
    ("train", "eval_every"): (1, "steps between held-out losses"),
    ("train", "eval_batches"): (1, "held-out batches per evaluation"),
    ("train", "checkpoint_every"): (1, "steps between checkpoints"),
    ("checkpoint", "keep"): (1, "newest checkpoints kept"),
    ("checkpoint", "keep_every"): (0, "the step period of checkpoints kept forever; 0 keeps none"),
}

# Float fields: (section, field) -> (the range as written in the error, its test, what the field is).
# NaN fails every test.
RANGES = {
    ("train", "lr"): ("> 0", lambda v: v > 0, "the peak learning rate"),
    ("train", "min_lr_ratio"): ("in [0, 1]", lambda v: 0 <= v <= 1, "the final learning rate as a fraction of the peak"),
    ("train", "b1"): ("in [0, 1)", lambda v: 0 <= v < 1, "Adam's first-moment decay"),
    ("train", "b2"): ("in [0, 1)", lambda v: 0 <= v < 1, "Adam's second-moment decay"),
    ("train", "eps"): ("> 0", lambda v: v > 0, "Adam's epsilon, which keeps its division finite"),
    ("train", "weight_decay"): (">= 0", lambda v: v >= 0, "the decoupled weight decay"),
    ("train", "grad_clip"): (">= 0", lambda v: v >= 0, "the global-norm clip; 0 disables it"),
    ("train", "peak_flops"): (">= 0", lambda v: v >= 0, "per-device peak FLOP/s; 0 measures it"),
}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_count(config, section: str, field: str) -> None:
    least, meaning = COUNTS[section, field]
    value = config[section][field]
    if not _is_int(value) or value < least:
        raise ConfigError(f"{section}.{field}={value!r} must be an integer >= {least} ({meaning})")


def _check_range(config, section: str, field: str) -> None:
    bounds, test, meaning = RANGES[section, field]
    value = config[section][field]
    if not isinstance(value, (int, float)) or not test(value):
        raise ConfigError(f"{section}.{field}={value!r} must be {bounds} ({meaning})")


def _one_of(config, section: str, field: str, allowed: tuple[str, ...]) -> None:
    value = config[section][field]
    if value not in allowed:
        raise ConfigError(f"{section}.{field}={value!r} is unknown; choose one of {', '.join(allowed)}")


def check_mesh_fields(mesh_config) -> None:
    """Each axis size is a positive integer or -1 (fill the remaining devices), and one axis at most fills;
    `slices` (absent from configs saved before it existed) is a positive integer."""
    value = mesh_config.get("slices", 1)
    if not _is_int(value) or value < 1:
        raise ConfigError(f"mesh.slices={value!r} must be a positive integer (the TPU slices the run spans; "
                          "1 for one slice or one machine)")
    for axis in MESH_AXES:
        value = mesh_config.get(axis, 1)  # expert: absent from configs saved before it existed
        if not _is_int(value) or (value < 1 and value != -1):
            raise ConfigError(f"mesh.{axis}={value!r} must be a positive integer, or -1 to fill the devices "
                              "the other axes leave")
    filling = [a for a in MESH_AXES if mesh_config.get(a, 1) == -1]
    if len(filling) > 1:
        raise ConfigError(f"mesh.{filling[0]} and mesh.{filling[1]} are both -1; at most one axis can fill the "
                          "remaining devices, so give the other a size")


def check_train(config) -> None:
    """The `train` and `checkpoint` sections, and how they meet the model."""
    for section, field in COUNTS:
        _check_count(config, section, field)
    for section, field in RANGES:
        _check_range(config, section, field)
    _one_of(config, "train", "schedule", SCHEDULES)
    _one_of(config, "train", "on_nonfinite", ON_NONFINITE)
    t = config.train
    if t.warmup_steps >= t.steps:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps} is not below train.steps={t.steps}, so the learning "
                          f"rate never reaches its peak nor decays; lower warmup_steps (e.g. to {t.steps // 10}) "
                          "or raise steps")
    if t.batch_size % t.micro_batches:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by train.micro_batches="
                          f"{t.micro_batches}; pick a micro-batch count that divides the batch")
    from heft.train import profile

    profile.check(config)
    if config.model.positions == "learned" and t.seq_len > config.model.max_len:
        raise ConfigError(f"train.seq_len={t.seq_len} exceeds model.max_len={config.model.max_len} (learned "
                          "positions); raise max_len or lower seq_len")


def check_keys(config) -> None:
    """`checkpoint.signing_key` and `verify_key`, when set, name files that exist (local or gs://)."""
    from heft.data import paths

    for field in ("signing_key", "verify_key"):
        value = config.checkpoint.get(field) or ""
        if value and not paths.path(value).exists():
            raise ConfigError(f"checkpoint.{field}={value!r} does not exist; make a key pair with "
                              "`heft verify --new_key=PATH` or unset the field")


def check_config(config) -> None:
    """Every error the config alone can show, model first; raises ConfigError for the first one."""
    model_checks.check_model(config.model)
    check_mesh_fields(config.mesh)
    check_train(config)
    check_keys(config)


def batch_devices(config, axis_sizes) -> int:
    """How many devices split the batch: the product of the mesh axes the rules give the `batch` axis.

    `axis_sizes`: {"slices": .., "data": .., "fsdp": .., "tensor": ..} (a mesh's `shape`, or a layout
    being considered); an axis it leaves out has size 1.
    """
    return rules.size(axis_sizes, rules.spec(("batch",), config)[0])


def check_batch(config, axis_sizes, batch_size: int, name: str = "train.batch_size") -> None:
    """The one batch-divisibility check: `batch_size` sequences split evenly over the batch's devices."""
    n = batch_devices(config, axis_sizes)
    if batch_size % n:
        raise ConfigError(f"{name}={batch_size} is not divisible by the {n} devices that split the batch on mesh "
                          f"{dict(axis_sizes)}; pick a batch size that is a multiple of {n}")


def check(config, mesh) -> None:
    """Every error a user can cause in the config of a run on `mesh`, raised before anything compiles."""
    check_config(config)
    t = config.train
    check_batch(config, mesh.shape, t.batch_size)
    n = batch_devices(config, mesh.shape)
    micro = t.batch_size // t.micro_batches
    if micro % n:
        raise ConfigError(f"train.batch_size={t.batch_size} in train.micro_batches={t.micro_batches} gives "
                          f"micro-batches of {micro} sequences, which do not split over the {n} devices that hold "
                          "the batch; use fewer micro-batches or a larger batch")
    experts.check(config, mesh)  # the expert axis splits the experts evenly
    kernels.resolve(config.model, mesh.devices.flat[0].platform, t.seq_len)  # flash where it cannot run
    sharding.param_dict_shardings(config.model, mesh, config)  # divisibility of every parameter
