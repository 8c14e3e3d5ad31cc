"""docker/Dockerfile, really built (slow, opt-in: DAS_DOCKER_TEST=1).

No image can be pulled here, so the base is made locally: `debootstrap` a minimal Debian 12
(Python 3.11, like the CPU torch wheel of this machine) and `podman import` it. The image is
built from a copy of the package sources with that wheel in docker/wheels (TORCH_SPEC), then
`das --version` (and `das doctor` where it exists) runs inside, as the non-root user.
Needs root, podman, runc and debootstrap (apt-get install podman runc debootstrap) and network
access to the Debian and PyPI registries; takes several minutes, so `make test` leaves it out
unless DAS_DOCKER_TEST=1 is set. In VMs without a full cgroup v2 setup crun refuses ("cgroups
in hybrid mode not supported"): runc with cgroupfs, host networking and ulimits lowered below
the host's hard limits work.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BASE = "localhost/das-debian-base:bookworm"
IMAGE = "localhost/das-pipeline:test"
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
LIMITS = ["--network=host", "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("DAS_DOCKER_TEST") != "1",
                       reason="builds a container image (minutes, network): set DAS_DOCKER_TEST=1"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in ("podman", "runc", "debootstrap")),
                       reason="needs podman, runc and debootstrap (apt-get install podman runc "
                       "debootstrap)"),
]


def sh(*cmd, timeout=1800, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                          **kw)
    assert done.returncode == 0, f"{cmd}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def local_base(tmp: Path) -> str:
    """A minimal Debian 12 image made from packages, cached in podman's image store."""
    if subprocess.run([*PODMAN, "image", "exists", BASE]).returncode == 0:
        return BASE
    rootfs = tmp / "rootfs"
    sh("debootstrap", "--variant=minbase", "bookworm", rootfs, "http://deb.debian.org/debian")
    tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
    sh(*PODMAN, "import", "--change", "CMD [\"/bin/bash\"]", "-", BASE, stdin=tar.stdout)
    tar.wait()
    return BASE


def host_ca() -> list[str]:
    """Build options that let pip in the build trust what pip on this host trusts (a
    TLS-inspecting proxy's CA, when the host's pip is configured with one)."""
    cert = Path(os.environ.get("PIP_CERT", "/etc/ssl/certs/ca-certificates.crt"))
    if not cert.is_file():
        return []
    return ["--volume", f"{cert}:/run/host-ca.crt:ro", "--build-arg",
            "PIP_CERT_FILE=/run/host-ca.crt"]


def test_image_builds_on_a_local_debian_base_and_runs_das(tmp_path):
    wheels = sorted(Path("/opt/wheels").glob("torch-2.13.0+cpu-cp311-*.whl"))
    if not wheels:
        pytest.skip("no local CPU torch 2.13.0 wheel for Python 3.11 in /opt/wheels")
    base = local_base(tmp_path)
    ctx = tmp_path / "ctx"
    for name in ("pipeline", "kernels", "launch", "docker"):
        shutil.copytree(ROOT / name, ctx / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "constraints.txt", "README.md"):
        shutil.copy(ROOT / name, ctx / name)
    shutil.copy(wheels[0], ctx / "docker" / "wheels" / wheels[0].name)
    sh(*PODMAN, "build", *LIMITS, "-f", ctx / "docker" / "Dockerfile",
       "--build-arg", f"BASE_IMAGE={base}",
       "--build-arg", f"TORCH_SPEC=/opt/wheels/{wheels[0].name}", *host_ca(), "-t", IMAGE, ctx)
    run = [*PODMAN, "run", "--rm", *LIMITS]
    assert sh(*run, IMAGE, "--version").stdout.strip() == "das-pipeline 0.1.0"
    assert sh(*run, "--entrypoint", "id", IMAGE, "-u").stdout.strip() == "10001"
    if "doctor" in sh(*run, IMAGE, "--help").stdout:  # `das doctor` where this branch has it
        sh(*run, IMAGE, "doctor")
