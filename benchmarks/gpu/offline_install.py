"""Make this checkout importable as the installed `ember` distribution where pip cannot build it
(a device machine with no network): one folder to put on PYTHONPATH, holding a link per package
(pyproject's package-dir: ember -> core, ember_cuda -> plugins/cuda, ...) and an
ember-<version>.dist-info with the entry points, so the backend plugins are found as
`pip install -e .` would register them. Nothing is built: cpu_gguf's C kernels build on first use.

    python3 benchmarks/gpu/offline_install.py /tmp/ember-site && export PYTHONPATH=/tmp/ember-site

Standard library only (tomllib: Python 3.11 or later).
"""
from __future__ import annotations

import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def install(site: Path) -> list[str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = meta["project"]
    package_dir = meta["tool"]["setuptools"]["package-dir"]
    site.mkdir(parents=True, exist_ok=True)
    for name, rel in package_dir.items():
        link = site / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(ROOT / rel, target_is_directory=True)
    dist = site / f"{project['name']}-{project['version']}.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\n"
                                   f"Version: {project['version']}\n")
    groups = dict(project.get("entry-points", {}))
    if project.get("scripts"):
        groups["console_scripts"] = project["scripts"]
    (dist / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n" for group, eps in groups.items()))
    (dist / "top_level.txt").write_text("".join(f"{name}\n" for name in package_dir))
    (dist / "INSTALLER").write_text("benchmarks/gpu/offline_install.py\n")
    return sorted(package_dir)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    names = install(Path(sys.argv[1]).resolve())
    print(f"{sys.argv[1]}: {', '.join(names)} linked from {ROOT}")
