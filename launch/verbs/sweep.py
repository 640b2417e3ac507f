"""`heft sweep --sweep=configs/sweeps/NAME.py --workdir=DIR [--parallel=N] [--report] [-- heft train flags]`:
run every point of a sweep as an ordinary heft run in DIR/POINT (skipping done points, resuming
unfinished ones), then write the table, plots and fits (scaling/).

    heft sweep --sweep=configs/sweeps/width.py --workdir=runs/width            # run, then report
    heft sweep --sweep=configs/sweeps/width.py --workdir=runs/width --report   # report only
"""

from absl import flags

from heft.model.checks import ConfigError


def define_flags():
    flags.DEFINE_string("sweep", None, "a sweep file: configs/sweeps/NAME.py with points() and get_config(point)")
    flags.DEFINE_string("workdir", None, "each point runs in WORKDIR/POINT; the report goes to WORKDIR/report")
    flags.DEFINE_integer("parallel", 1, "points trained at once")
    flags.DEFINE_bool("report", False, "only collect and report what has run")
    flags.DEFINE_bool("list", False, "list the points, their overrides and status, and exit")


def main(argv):
    from heft.scaling import report, sweep

    f = flags.FLAGS
    if not f.sweep or not f.workdir:
        raise ConfigError("heft sweep needs --sweep=configs/sweeps/NAME.py and --workdir=DIR")
    if f.parallel < 1:
        raise ConfigError(f"--parallel={f.parallel} must be at least 1")
    if f.list:
        for p in sweep.points(f.sweep, f.workdir):
            print(f"{p.name:<16} {p.status:<8} {p.overrides}")
        return
    failed = [] if f.report else sweep.run(f.sweep, f.workdir, f.parallel, extra=argv[1:])
    print(report.summary(report.write(f.sweep, f.workdir)))
    if failed:
        raise ConfigError(f"sweep points {', '.join(failed)} failed (the report leaves them out); "
                          "see WORKDIR/NAME/train.log for each")
