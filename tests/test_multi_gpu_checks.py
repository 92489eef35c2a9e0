"""benchmarks/multi_gpu_checks.py without launching anything: its plan of launches (the GPU run
gets one 10-minute call, so the count and the dependencies matter) and its loss arithmetic.
The script itself is run end to end by `python benchmarks/multi_gpu_checks.py --cpu`."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mgc():
    spec = importlib.util.spec_from_file_location("multi_gpu_checks",
                                                  REPO / "benchmarks" / "multi_gpu_checks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def plan(mgc, tmp_path, *argv):
    args = mgc.parse_args(list(argv))
    ctx = mgc.Ctx(args=args, root=tmp_path, out=tmp_path / "r.json", t0=0.0, deadline=0.0,
                  precision="no")
    return ctx, mgc.build_tasks(ctx)


def test_launch_plan_fits_one_gpu_call(mgc, tmp_path):
    ctx, tasks = plan(mgc, tmp_path)
    names = [t.name for t in tasks]
    launches = [n for n in names if "convert" not in n]
    assert len(launches) == 19 and len(names) == len(set(names))
    assert sorted(n for n in names if "convert" in n) == ["zero2/convert_1", "zero2/convert_2"]
    by_name = {t.name: t for t in tasks}
    for t in tasks:  # dependencies exist and come earlier (the scheduler starts in order)
        assert all(names.index(d) < names.index(t.name) for d in t.deps), t.name
    assert by_name["zero2/shrink"].deps == ("zero2/convert_2",)  # ZeRO: universal first
    assert by_name["ddp/shrink"].deps == ("ddp/two",)  # DDP checkpoints load at any size
    assert by_name["zero3/resume"].deps == ("zero3/stop",)
    assert not any(n.startswith("zero3/") and ("shrink" in n or "grow" in n) for n in names)
    # Every check names runs that exist.
    for mode in ctx.args.modes:
        for _name, needs, _fn in mgc.checks_for(ctx, mode):
            assert set(needs) <= set(names)


def test_shipped_launch_configs_are_used(mgc):
    for mode in mgc.MODES:
        for procs in (1, 2):
            files = mgc.launch_files(mode, procs)
            paths = [Path(files[i + 1]) for i, f in enumerate(files) if f.endswith("_file")]
            assert all(p.is_file() and p.parent == REPO / "launch" for p in paths)
    assert Path(mgc.launch_files("ddp", 2)[1]).name == "ddp.yaml"
    assert Path(mgc.launch_files("ddp", 1)[1]).name == "gpu_single.yaml"
    assert Path(mgc.launch_files("zero3", 2)[3]).name == "ds_zero3.json"


def test_bad_step_layout_is_refused(mgc):
    with pytest.raises(SystemExit):
        mgc.parse_args(["--resume-from", "12"])  # not a periodic checkpoint
    with pytest.raises(SystemExit):
        mgc.parse_args(["--stop-after", "30"])  # past the end


def test_global_loss_and_gaps(mgc):
    probes = [{"losses": [[1, 0, 1.0], [2, 2, 3.0]]}, {"losses": [[1, 0, 2.0], [2, 2, 5.0]]}]
    per = mgc.step_losses(probes)
    assert per == {1: [1.0, 2.0], 2: [3.0, 5.0]}
    assert mgc.global_loss(per) == {1: 1.5, 2: 4.0}  # equal slices: mean of the rank means
    assert mgc.step_losses(probes, lo=2) == {2: [3.0, 5.0]}
    g = mgc.gaps({1: 1.5, 2: 4.0}, {1: 1.5, 2: 4.4}, [1, 2])
    assert g["first_differing_step"] == 2 and g["worst_step"] == 2
    assert math.isclose(g["max_abs"], 0.4) and math.isclose(g["max_rel"], 0.4 / 4.4)
