"""`heft plan --config=configs/NAME.py --topology=v5p:4x8x8 [--slices=K] [--search] [--json]`: compile the
real train step for a TPU slice (or K of them) on this machine and predict fit, step time and MFU
(launch/plan.py, search.py)."""

import json
import sys

from absl import flags

from heft.model.checks import ConfigError


def define_flags():
    from heft.launch.flags import define_config

    define_config()
    flags.DEFINE_string("topology", None, "TPU slice as libtpu names it: v4:AxBxC, v5p:AxBxC, v5e:AxB, v6e:AxB "
                        "(chips per axis; v5p:4x8x8 is the 256-chip v5p-512)")
    flags.DEFINE_integer("slices", None, "plan for this many such slices joined by the data-center network "
                         "(sets mesh.slices; the batch is split across them)")
    flags.DEFINE_bool("search", False, "try mesh layouts, remat policies and micro-batch counts; rank those that fit")
    flags.DEFINE_integer("budget", 16, "with --search: most compiles to spend (70B: ~2 min each on 2 CPU cores)")
    flags.DEFINE_bool("json", False, "print one JSON object instead of a table")


def main(argv):
    del argv
    import jax  # here, not above: `heft plan --help` needs no JAX

    from heft.launch import plan, search, topology

    # Planning compiles for abstract devices and never runs on a chip: keep JAX's own backend on
    # the CPU, so a plan on a TPU VM does not claim (or wait for) the chips a run is using.
    jax.config.update("jax_platforms", "cpu")
    f = flags.FLAGS
    if not f.topology:
        raise ConfigError("--topology is required: the TPU slice to plan for, e.g. --topology=v5p:4x8x8")
    topology.parse(f.topology)  # name errors before the slow parts
    if f.slices is not None:
        if f.slices < 1:
            raise ConfigError(f"--slices={f.slices} must be a positive number of slices")
        f.config.mesh.slices = f.slices
    if not topology.libtpu_available():
        raise ConfigError(topology.INSTALL)
    if f.search:
        result = search.search(f.config, f.topology, budget=f.budget,
                               progress=lambda s: print(s, file=sys.stderr, flush=True))
        print(json.dumps(result.to_json()) if f.json else search.table(result))
        return
    p = plan.plan(f.config, f.topology, note=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(p.to_json()) if f.json else plan.table(p))
