"""What ``kdtune --version`` prints for a bug report: kdtune's version and git commit, Python, the
libraries a search runs on, and the CUDA devices torch sees."""
from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

LIBRARIES = ("torch", "torchvision", "ray", "optuna", "mlflow", "numpy", "pandas")


def git_commit() -> tuple[str, bool] | None:
    """``(commit, dirty)`` of the checkout kdtune runs from, or None outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit.stdout.strip(), bool(dirty)
    except (OSError, subprocess.SubprocessError):
        return None


def installed(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def report() -> str:
    from kdtune import __version__

    git = git_commit()
    lines = [f"kdtune {__version__}" + (f" (git {git[0][:12]}{', with uncommitted changes' if git[1] else ''})"
                                        if git else "")]
    lines.append(f"Python {platform.python_version()} ({platform.platform()})")
    lines += [f"{name} {installed(name)}" for name in LIBRARIES]
    try:
        import torch

        cuda = torch.version.cuda
        devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        lines.append(f"CUDA: torch built for {cuda or 'CPU only'}; devices: "
                     + (", ".join(f"{i}: {d}" for i, d in enumerate(devices)) if devices else "none"))
    except ImportError:
        pass
    return "\n".join(lines)
