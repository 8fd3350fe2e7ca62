"""The repository works for a stranger's fresh clone: nothing tracked points at one machine's file system,
and the shipped configs follow their own rule (only what differs from the defaults)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

from conftest import REPO
from utils.config import Config, config_to_dict, load_config

# absolute paths that exist only on someone's machine (written in pieces so this file does not match itself)
MACHINE_PATHS = ["/" + "work/", "/" + "root/", "/" + "home/", "/" + "Users/", "/" + "mnt/", "C:" + "\\Users"]


def tracked(repo: Path = REPO) -> list[tuple[str, str]]:
    """(git mode, path) of every tracked file."""
    out = subprocess.run(["git", "ls-files", "-s"], cwd=repo, capture_output=True, text=True, check=True).stdout
    return [(line.split()[0], line.split("\t", 1)[1]) for line in out.splitlines()]


def leaving_links(repo: Path) -> list[str]:
    """Each tracked symbolic link that points at an absolute path, outside the repository, or at nothing."""
    bad = []
    for mode, path in tracked(repo):
        if mode != "120000":
            continue
        target = os.readlink(repo / path)
        resolved = (repo / path).parent.joinpath(target).resolve()
        if os.path.isabs(target) or not resolved.is_relative_to(repo.resolve()) or not resolved.exists():
            bad.append(f"{path} -> {target}")
    return bad


def test_no_tracked_link_leaves_the_repository():
    assert leaving_links(REPO) == []


def test_a_planted_link_out_of_the_repository_is_reported(tmp_path):
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    (repo / "data" / "inside.txt").write_text("x")
    (repo / "good").symlink_to("data/inside.txt")
    (repo / "absolute").symlink_to(tmp_path)
    (repo / "up").symlink_to("../outside")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    assert sorted(leaving_links(repo)) == [f"absolute -> {tmp_path}", "up -> ../outside"]


def test_no_tracked_text_names_a_machine_path():
    own = str(REPO.resolve())
    for mode, path in tracked():
        if mode == "120000" or Path(path).suffix in (".png", ".gif"):
            continue
        text = (REPO / path).read_bytes().decode("utf-8", errors="ignore")
        for needle in [own, *MACHINE_PATHS]:
            assert needle not in text, f"{path} names the machine path {needle}"


def test_shipped_configs_hold_only_what_differs_from_the_defaults():
    defaults = config_to_dict(Config())
    for path in sorted((REPO / "configs").glob("*.yaml")):
        tree = yaml.safe_load(path.read_text())
        resolved = config_to_dict(load_config(path))
        for section, values in tree.items():
            for key, value in values.items():
                assert resolved[section][key] != defaults[section][key], \
                    f"{path.name}: {section}.{key}: {value!r} is the default; drop the line"
        keys = [ln for ln in path.read_text().splitlines() if ln.startswith("  ") and not ln.strip().startswith("#")]
        assert keys, f"{path.name} sets nothing"
        for line in keys:
            assert "#" in line, f"{path.name}: '{line.strip()}' gives no reason"
