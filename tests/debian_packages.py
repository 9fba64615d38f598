"""Debian packages a test needs, installed with apt-get when missing (root + apt-get only).

Used by the SLURM harness (slurm, munge) and the DICOM test (libturbojpeg0 for wsidicomizer). CI
runs as root with apt, so there the packages are installed and the tests run; elsewhere the error
says why they cannot be, for a skip reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path


class DebianPackagesUnavailableError(RuntimeError):
    """The packages are missing and cannot be installed here; the message says why."""


def apt_install(
    packages: Sequence[str], missing: str, log: Callable[[str], object] = print
) -> None:
    """apt-get install `packages` (`missing` says what is absent, for the messages)."""
    if os.geteuid() != 0:
        raise DebianPackagesUnavailableError(f"{missing} missing and not root")
    apt = shutil.which("apt-get")
    if apt is None:
        raise DebianPackagesUnavailableError(f"{missing} missing and no apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # No init system in containers: keep the packages' maintainer scripts from starting services.
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = not policy.exists()
    if made_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        log(f"installing {' '.join(packages)} with apt-get ({missing} missing)")
        for args in (
            [apt, "update", "-q"],
            [
                apt,
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "-o",
                "Dpkg::Options::=--force-confdef",
                "-o",
                "Dpkg::Options::=--force-confold",
                *packages,
            ],
        ):
            result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
            if result.returncode != 0:
                raise DebianPackagesUnavailableError(
                    f"{' '.join(args)} failed ({result.returncode}):\n"
                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
                )
    finally:
        if made_policy:
            policy.unlink(missing_ok=True)
