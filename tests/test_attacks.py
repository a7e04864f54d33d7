"""Attacks whose path is an engine: a hostile value through `dvc repro`, `dvc exp run -S`, `snakemake` and an overlay.

DVC interpolates ``${item}`` (each backbone name) into a shell command and into
output paths it deletes before running a stage — before any hcd code runs. The
``check`` stage, which every other stage depends on, refuses the value first.
Each test runs the real engine in a fresh copy of the repository and checks
that nothing ran (no marker file), nothing outside the copy was deleted, and the
user saw one line naming the key. Nothing has been computed in the copy, so each
run stops at the first stage: these tests take seconds.
"""

from __future__ import annotations

import secrets
import subprocess

import pytest
from test_e2e import ENV, dvc_ran, repo_copy, set_params, sh

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("attacks")
    root = repo_copy(base / "repo")
    victim = base / f"victim-{secrets.token_hex(3)}"  # outside the repository, where a traversal would land
    for sub in ("", "plots/metrics"):
        (victim / sub).mkdir(parents=True, exist_ok=True)
        (victim / sub / "model.safetensors").write_text("someone's work")
        (victim / sub / "model.json").write_text("{}")
        (victim / sub / "metrics.json").write_text("{}")
    return root, base, victim


def _clean(root) -> None:
    sh(root, "git", "checkout", "--", "params.yaml")
    sh(root, "git", "clean", "-fdq", "-e", ".dvc")


def _intact(victim) -> None:
    assert sorted(str(p.relative_to(victim)) for p in victim.rglob("*") if p.is_file()) == ["metrics.json", "model.json", "model.safetensors", "plots/metrics/metrics.json", "plots/metrics/model.json", "plots/metrics/model.safetensors"]


def _injections(base):
    marker = base / f"pwned-{secrets.token_hex(3)}"
    return marker, [f"x;touch {marker};#", f"x;{{touch,{marker}}};#", f"$(touch {marker})", f"`touch {marker}`"]


def _refused(out: str, marker) -> None:
    assert not marker.exists(), "a backbone name ran as a command"
    assert "hcd check: error: params.yaml: backbones:" in out and "is not a usable name" in out, out[-2000:]
    assert dvc_ran(out) <= {"check"}, f"a stage after check ran: {dvc_ran(out)}"


def test_dvc_repro_never_runs_a_backbone_name_as_a_command(world):
    root, base, _ = world
    marker, names = _injections(base)
    for name in names:
        set_params(root, backbones=["cnn", name])
        _refused(sh(root, "dvc", "repro", ok=False), marker)
        _clean(root)


def test_dvc_exp_run_S_never_runs_a_backbone_name_as_a_command(world):
    root, base, _ = world
    marker, names = _injections(base)
    for name in names:
        _refused(sh(root, "dvc", "exp", "run", "-S", f'backbones=[cnn,"{name}"]', ok=False), marker)
        _clean(root)


def test_a_traversing_backbone_name_deletes_nothing_outside_the_repository(world):
    root, base, victim = world
    depth = len(root.relative_to(base).parts) + 1  # models/<name>: one more level
    for name in (f"{'../' * depth}{victim.name}", f"{'../' * (depth + 1)}{victim.name}/plots"):
        set_params(root, backbones=["cnn", name])
        out = sh(root, "dvc", "repro", ok=False)
        assert "hcd check: error: params.yaml: backbones:" in out, out[-2000:]
        _intact(victim)
        _clean(root)
        out = sh(root, "dvc", "exp", "run", "-S", f"backbones=[cnn,{name}]", ok=False)
        assert "backbones" in out
        _intact(victim)
        _clean(root)


def test_snakemake_refuses_a_hostile_name_before_any_rule(world):
    root, base, victim = world
    marker, names = _injections(base)
    for name in [*names, f"../../{victim.name}"]:
        set_params(root, backbones=["cnn", name])
        out = sh(root, "snakemake", "--cores", "1", ok=False)
        assert not marker.exists() and "hcd: params.yaml: backbones:" in out and "is not a usable name" in out, out[-2000:]
        _intact(victim)
        _clean(root)


def test_an_overlay_through_params_flags_is_validated_before_dvc_sees_it(world):
    root, base, _ = world
    marker, names = _injections(base)
    overlay = base / "colleague.yaml"
    overlay.write_text(f'backbones: [cnn, "x;{{touch,{marker}}};#"]\n')
    # exactly as the README shows it, in a real shell: the flags are refused, so DVC never runs
    proc = subprocess.run(["bash", "-c", f"flags=$(hcd params flags {overlay}) && eval \"dvc exp run $flags\""], cwd=root, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 2 and not marker.exists(), proc.stderr[-2000:]
    assert "hcd params: error:" in proc.stderr and "backbones" in proc.stderr and "Running stage" not in proc.stdout + proc.stderr
    assert (root / "params.yaml").read_text() == sh(root, "git", "show", "HEAD:params.yaml")
