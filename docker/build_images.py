"""Build and push the two stage images (CPU and CUDA) through the Docker SDK for Python.

    .venv/bin/python docker/build_images.py --registry registry.example.com/meddiff   # or: make images REGISTRY=...

Tags: ``<registry>/meddiff:<package version>-<commit[:12]>`` (``docker/Dockerfile``) and the same with
``-cuda`` (``docker/Dockerfile.cuda``); the commit is also baked into the images as
``MEDDIFF_GIT_COMMIT`` (what :func:`meddiff.tracking.git_commit` reports in a pod, where there is no
``.git``) and as the OCI revision label. A dirty working tree is refused (the tag would lie) unless
``--allow-dirty``. Pushing uses the credentials of ``docker login`` (``~/.docker/config.json``).

The Docker engine is checked first (``ping`` within ``--timeout`` seconds): where none answers the
script stops at once, exit status 3, saying where it looked. At the end it prints the two
``MEDDIFF_IMAGE`` / ``MEDDIFF_GPU_IMAGE`` lines to export before ``meddiff pipeline compile|submit``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REPOSITORY_NAME = "meddiff"
EXIT_NO_ENGINE = 3
EXIT_BUILD_FAILED = 4


@dataclass(frozen=True)
class ImageSpec:
    dockerfile: str
    repository: str
    tag: str

    @property
    def ref(self) -> str:
        return f"{self.repository}:{self.tag}"


def image_specs(registry: str, version: str, commit: str) -> list[ImageSpec]:
    """The CPU and CUDA images for ``registry`` (``host[:port]/path``), package ``version`` and ``commit``."""
    registry = registry.strip().rstrip("/")
    if not registry or "://" in registry or " " in registry:
        raise ValueError(f"registry must look like host[:port]/path, e.g. ghcr.io/meddiff; got {registry!r}")
    repository = f"{registry}/{REPOSITORY_NAME}"
    tag = f"{version}-{commit[:12]}"
    return [
        ImageSpec("docker/Dockerfile", repository, tag),
        ImageSpec("docker/Dockerfile.cuda", repository, f"{tag}-cuda"),
    ]


def _dirty() -> bool:
    result = subprocess.run(
        ["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
        cwd=REPO, capture_output=True, text=True, check=False, timeout=30,
    )
    return result.returncode != 0 or bool(result.stdout.strip())


def _stream(chunks, what: str) -> None:
    """Print a build/push progress stream; raise RuntimeError on the first error chunk."""
    for chunk in chunks:
        if "error" in chunk or "errorDetail" in chunk:
            detail = chunk.get("errorDetail", {}).get("message") or chunk.get("error")
            raise RuntimeError(f"{what}: {detail}")
        text = chunk.get("stream") or chunk.get("status")
        if text:
            print(text.rstrip("\n") if chunk.get("stream") else f"{text} {chunk.get('progress', '')}".rstrip())


def build_and_push(client, spec: ImageSpec, commit: str, push: bool) -> None:
    print(f"== build {spec.ref} from {spec.dockerfile}", flush=True)
    _stream(
        client.api.build(
            path=str(REPO), dockerfile=spec.dockerfile, tag=spec.ref, rm=True, decode=True,
            buildargs={"MEDDIFF_GIT_COMMIT": commit},
        ),
        f"building {spec.ref}",
    )
    if push:
        print(f"== push {spec.ref}", flush=True)
        _stream(client.api.push(spec.repository, tag=spec.tag, stream=True, decode=True), f"pushing {spec.ref}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registry", required=True, help="host[:port]/path the images are pushed to")
    parser.add_argument("--no-push", dest="push", action="store_false", help="build only")
    parser.add_argument("--allow-dirty", action="store_true", help="build from uncommitted changes")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds the Docker engine has to answer")
    args = parser.parse_args(argv)

    from meddiff_pipelines.local import DockerUnavailableError, connect_docker

    import docker
    import meddiff
    from meddiff.tracking import git_commit

    commit = git_commit()
    try:
        specs = image_specs(args.registry, meddiff.__version__, commit)
    except ValueError as error:
        print(f"build_images: error: {error}", file=sys.stderr)
        return 2
    try:
        client = connect_docker(args.timeout)
    except DockerUnavailableError as error:
        print(
            f"build_images: error: {error}\n  The images need a Docker engine (set DOCKER_HOST to reach a "
            "remote one); nothing was built.",
            file=sys.stderr,
        )
        return EXIT_NO_ENGINE
    try:
        if commit == "unknown":
            print("build_images: error: no git commit to tag the images with", file=sys.stderr)
            return 2
        if _dirty() and not args.allow_dirty:
            print(
                f"build_images: error: uncommitted changes; the tag {specs[0].tag} would not describe the "
                "image. Commit first or pass --allow-dirty.",
                file=sys.stderr,
            )
            return 2
        for spec in specs:
            build_and_push(client, spec, commit, args.push)
    except (RuntimeError, docker.errors.DockerException) as error:
        print(f"build_images: error: {error}", file=sys.stderr)
        return EXIT_BUILD_FAILED
    finally:
        client.close()
    print(f"MEDDIFF_IMAGE={specs[0].ref}")
    print(f"MEDDIFF_GPU_IMAGE={specs[1].ref}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
