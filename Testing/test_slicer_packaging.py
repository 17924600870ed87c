"""Extension packaging: what the Slicer build installs and what the Extensions Index checks.

A file under MAMLSegmentation/ that is missing from MAMLSegmentation/CMakeLists.txt is silently
absent from the installed extension; these tests name it.
"""

from __future__ import annotations

import fnmatch
import json
import re
import struct
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "MAMLSegmentation"
NAME = "MAMLSegmentation"
MB = 1024 * 1024


def repo_files(under: Path = REPO) -> list:
    """Files that are or would be committed (tracked + untracked, not ignored)."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", "."],
                             cwd=under, capture_output=True, check=True).stdout
        files = [under / p for p in out.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        skip = {"__pycache__", ".git", ".venv", ".pytest_cache"}
        files = [p for p in under.rglob("*") if p.is_file() and not skip & set(p.relative_to(under).parts)
                 and p.suffix != ".pyc" and not any(part.endswith(".egg-info") for part in p.parts)]
    return sorted(p for p in files if p.is_file())


def cmake_list(text: str, variable: str) -> list:
    match = re.search(rf"set\(\s*{variable}\s+(.*?)\)", text, re.S)
    assert match, f"{variable} not set"
    items = [line.split("#")[0].strip() for line in match.group(1).splitlines()]
    return [item.replace("${MODULE_NAME}", NAME) for item in " ".join(items).split()]


def cmake_globs(text: str, variable: str) -> list:
    """Patterns of ``file(GLOB <variable> RELATIVE ${CMAKE_CURRENT_SOURCE_DIR} ...)`` appended to a list."""
    match = re.search(rf"file\(\s*GLOB\s+{variable}\s+RELATIVE\s+\S+\s+(.*?)\)", text, re.S)
    if not match:
        return []
    return [item.replace("${CMAKE_CURRENT_SOURCE_DIR}/", "") for item in match.group(1).split()]


def cmake_set(text: str, variable: str) -> str:
    match = re.search(rf'set\(\s*{variable}\s+"([^"]*)"', text)
    assert match, f"{variable} not set"
    return match.group(1)


def s4ext() -> dict:
    entries = {}
    for line in (REPO / f"{NAME}.s4ext").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            entries[key] = value.strip()
    return entries


def png_size(path: Path) -> tuple:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_every_module_file_is_listed_in_the_module_cmakelists():
    text = (MODULE / "CMakeLists.txt").read_text()
    scripts, resources = cmake_list(text, "MODULE_PYTHON_SCRIPTS"), cmake_list(text, "MODULE_PYTHON_RESOURCES")
    assert len(scripts) == len(set(scripts)) and len(resources) == len(set(resources)), "listed twice"
    globbed = []
    if "${MODULE_MODEL_FILES}" in text:
        globbed = cmake_globs(text, "MODULE_MODEL_FILES")
        assert globbed and all(g.startswith("Resources/Models/") for g in globbed), globbed
    present = {p.relative_to(MODULE).as_posix() for p in repo_files(MODULE)} - {"CMakeLists.txt"}
    present = {p for p in present if not p.startswith("Testing/")}
    missing_scripts = sorted(p for p in present if p.endswith(".py") and p not in scripts)
    missing_resources = sorted(p for p in present if not p.endswith(".py") and p not in resources
                               and not any(fnmatch.fnmatchcase(p, g) for g in globbed))
    assert not missing_scripts, "add to MODULE_PYTHON_SCRIPTS in MAMLSegmentation/CMakeLists.txt:\n  " + \
        "\n  ".join(missing_scripts)
    assert not missing_resources, "add to MODULE_PYTHON_RESOURCES in MAMLSegmentation/CMakeLists.txt:\n  " + \
        "\n  ".join(missing_resources)
    listed_but_absent = sorted(p for p in scripts + resources if not (MODULE / p).is_file())
    assert not listed_but_absent, f"listed but not in the repository: {listed_but_absent}"
    assert all(p.endswith(".py") for p in scripts) and not any(p.endswith(".py") for p in resources)


def test_extension_metadata_is_consistent():
    top = (REPO / "CMakeLists.txt").read_text()
    assert re.search(rf"project\(\s*{NAME}\s*\)", top)
    assert "add_subdirectory(MAMLSegmentation)" in top
    for include in ("${Slicer_USE_FILE}", "${Slicer_EXTENSION_GENERATE_CONFIG}", "${Slicer_EXTENSION_CPACK}"):
        assert f"include({include})" in top
    category = cmake_set(top, "EXTENSION_CATEGORY")
    depends = cmake_set(top, "EXTENSION_DEPENDS")
    assert category == "Segmentation" and depends == "PyTorch"
    for field in ("HOMEPAGE", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"):
        assert cmake_set(top, f"EXTENSION_{field}"), field

    catalog = json.loads((REPO / f"{NAME}.json").read_text())
    allowed = {"$schema", "build_dependencies", "build_subdirectory", "category", "scm_revision", "scm_type",
               "scm_url", "tier"}
    assert {"$schema", "category", "scm_url"} <= set(catalog) <= allowed
    assert re.search(r"slicer-extension-catalog-entry-schema-v1\.0\.\d\.json#$", catalog["$schema"])
    assert catalog["category"] == category and catalog["build_dependencies"] == [depends]
    legacy = s4ext()
    assert legacy["category"] == category and legacy["depends"] == depends
    assert legacy["scmurl"] == catalog["scm_url"] and legacy["scmrevision"] == catalog["scm_revision"]
    assert legacy["iconurl"] == cmake_set(top, "EXTENSION_ICONURL")
    assert legacy["homepage"] == cmake_set(top, "EXTENSION_HOMEPAGE")
    # Index rules: the extension name does not start with "Slicer", the repository name does.
    repository = catalog["scm_url"].rstrip("/").removesuffix(".git").rsplit("/", 1)[-1]
    assert not NAME.startswith("Slicer") and repository == "Slicer" + NAME


def test_icons_are_128_pixel_pngs_and_the_icon_url_points_at_one():
    top = (REPO / "CMakeLists.txt").read_text()
    url = cmake_set(top, "EXTENSION_ICONURL")
    path = REPO / re.sub(r"^https://raw\.githubusercontent\.com/[^/]+/[^/]+/[^/]+/", "", url)
    assert path.is_file(), f"icon URL {url} does not name a file of this repository"
    assert png_size(path) == (128, 128)
    assert png_size(MODULE / "Resources" / "Icons" / f"{NAME}.png") == (128, 128)


def test_screenshot_url_points_at_a_png():
    url = cmake_set((REPO / "CMakeLists.txt").read_text(), "EXTENSION_SCREENSHOTURLS").split()[0]
    path = REPO / re.sub(r"^https://raw\.githubusercontent\.com/[^/]+/[^/]+/[^/]+/", "", url)
    if not path.exists():
        pytest.skip(f"screenshot {path.relative_to(REPO)} is made from the first end-to-end run in Slicer")
    width, height = png_size(path)
    assert width >= 400 and height >= 300


def test_license_is_the_full_apache_2_text():
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text) > 10000


def test_no_file_over_20_mb_and_repository_well_under_100_mb():
    files = repo_files()
    sizes = {p.relative_to(REPO).as_posix(): p.stat().st_size for p in files}
    big = {p: round(s / MB, 1) for p, s in sizes.items() if s > 20 * MB}
    assert not big, f"files over 20 MB: {big}"
    assert sum(sizes.values()) < 50 * MB, f"repository is {sum(sizes.values()) / MB:.1f} MB"
