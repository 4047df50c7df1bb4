"""The image, its build and the workflows: the properties the release path depends on.

The linters (scripts/check_iac.sh) check each file against its tool's rules; these check Cutout's own:
the torch build matches the CUDA the L4 driver runs, weights are baked in, the image runs as a user,
the build caches and tags, every action is pinned, the deploy canaries and rolls back.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text(encoding="utf-8")
WORKFLOWS = {path.stem: path for path in (ROOT / ".github" / "workflows").glob("*.yml")}


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    result = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def stages() -> dict[str, list[tuple[str, str]]]:
    named: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for instruction, args in instructions():
        if instruction == "FROM":
            current = []
            named[args.split(" AS ")[-1].strip()] = current
        current.append((instruction, args))
    return named


def arg_default(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE, re.MULTILINE)
    assert match, f"no ARG {name}"
    return match.group(1)


def requirement(name: str) -> str:
    match = re.search(rf"^{name}==(\S+)$", (ROOT / "requirements.txt").read_text(encoding="utf-8"), re.MULTILINE)
    assert match, f"requirements.txt does not pin {name}"
    return match.group(1)


def workflow(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(WORKFLOWS[name].read_text(encoding="utf-8"))
    return loaded


def triggers(parsed: dict[str, Any]) -> Any:
    return parsed.get("on", parsed.get(True))  # YAML 1.1 reads a bare `on` as true


# ---------------------------------------------------------------- Dockerfile


def test_torch_is_the_cuda_build_the_cloud_run_l4_driver_runs() -> None:
    # Cloud Run's L4 driver is 535.x (CUDA 12.2); CUDA 12.x runs on it, CUDA 13 needs >= 580.
    base = stages()["cuda"][0][1]
    cuda = re.search(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-", base)
    assert cuda, base
    assert cuda.group(1) == "12"
    assert arg_default("TORCH_CUDA") == f"cu{cuda.group(1)}{cuda.group(2)}"
    assert "download.pytorch.org/whl/${TORCH_CUDA}" in DOCKERFILE


def test_torch_versions_match_requirements() -> None:
    assert arg_default("TORCH_VERSION") == requirement("torch")
    assert arg_default("TORCHVISION_VERSION") == requirement("torchvision")


def test_multi_stage_with_weights_baked_into_models() -> None:
    named = stages()
    assert {"python-deps", "weights", "runtime"} <= set(named)
    weights = " ".join(args for instruction, args in named["weights"] if instruction == "RUN")
    assert "scripts/fetch_weights.py /models" in weights
    runtime = named["runtime"]
    assert ("COPY", "--from=weights /models /models") in runtime
    env = " ".join(args for instruction, args in runtime if instruction == "ENV")
    assert "CUTOUT_MODELS_DIR=/models" in env
    assert "HOST=0.0.0.0" in env


def test_the_weights_stage_copies_everything_the_fetcher_imports(tmp_path: Path) -> None:
    # The weights stage copies only what fetching needs, so a change to the service alone reuses the
    # (~13 GB) weights layer; its copies must still be enough to run the fetcher.
    copies = [args.split() for instruction, args in stages()["weights"] if instruction == "COPY"]
    assert copies and all(len(parts) == 2 for parts in copies), copies
    assert {source for source, _ in copies} == {"scripts/fetch_weights.py", "effects/"}
    for source, target in copies:  # as Docker does: a directory's contents into the target, a file into it
        if source.endswith("/"):
            shutil.copytree(ROOT / source, tmp_path / target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (tmp_path / target).mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / source, tmp_path / target)
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    assert all(f"!{source}" in ignored for source, _ in copies), "the build context must let the copies through"
    # PYTHONPATH as the stage sets it (/src there); the repository itself is not on the path.
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(tmp_path), "HOME": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-s", "scripts/fetch_weights.py", "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "--cutout-only" in run.stdout and "EFFECT=HUB_ID" in run.stdout


def test_runs_python_m_service_as_a_non_root_user() -> None:
    runtime = stages()["runtime"]
    users = [args for instruction, args in runtime if instruction == "USER"]
    assert users and not users[-1].startswith(("0", "root"))
    assert runtime[-1] == ("CMD", '["python", "-m", "service"]')
    assert ("EXPOSE", "8080") in runtime


def test_no_healthcheck_cloud_run_probes_instead() -> None:
    assert all(instruction != "HEALTHCHECK" for instruction, _ in instructions())


def test_build_context_is_an_allowlist() -> None:
    lines = [line for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines() if line]
    assert "*" in lines
    for needed in ("!requirements.txt", "!service/", "!effects/", "!cache/"):
        assert needed in lines


# ---------------------------------------------------------------- cloudbuild.yaml


def test_cloud_build_uses_a_large_worker_caches_layers_and_tags_with_tag_and_commit() -> None:
    build = yaml.safe_load((ROOT / "cloudbuild.yaml").read_text(encoding="utf-8"))
    assert build["options"]["machineType"] == "E2_HIGHCPU_32"
    assert int(build["options"]["diskSizeGb"]) >= 200
    script = "\n".join(str(arg) for step in build["steps"] for arg in step.get("args", []))
    assert "--cache-from" in script and "mode=max" in script
    assert '"$${IMAGE}:$${TAG}"' in script and '"$${IMAGE}:$${COMMIT}"' in script
    env = [entry for step in build["steps"] for entry in step.get("env", [])]
    assert "TAG=${_TAG}" in env and "COMMIT=${_COMMIT_SHA}" in env
    assert "IMAGE=${_REGION}-docker.pkg.dev/${PROJECT_ID}/${_REPOSITORY}/${_IMAGE_NAME}" in env


def build_step() -> dict[str, Any]:
    build = yaml.safe_load((ROOT / "cloudbuild.yaml").read_text(encoding="utf-8"))
    step: dict[str, Any] = next(step for step in build["steps"] if step["id"] == "build-and-push")
    return step


def test_cloud_build_pins_a_buildx_that_talks_to_its_docker_daemon() -> None:
    # Cloud Build's daemon speaks API 1.41; buildx 0.31-0.32 require >= 1.44 (docker/buildx#3654),
    # 0.33.0 lowered the floor to 1.40 (docker/buildx#3684).
    build = yaml.safe_load((ROOT / "cloudbuild.yaml").read_text(encoding="utf-8"))
    version = build["substitutions"]["_BUILDX_VERSION"]
    match = re.fullmatch(r"v(\d+)\.(\d+)\.(\d+)", version)
    assert match and (int(match.group(1)), int(match.group(2))) >= (0, 33), version
    assert re.fullmatch(r"[0-9a-f]{64}", build["substitutions"]["_BUILDX_SHA256"])
    script = build_step()["args"][-1]
    install = script.index("sha256sum --check")
    assert install < script.index("docker buildx create") < script.index("docker buildx build")
    assert "buildx-$${BUILDX_VERSION}.linux-amd64" in script and '/cli-plugins"' in script
    assert "$${plugins}/docker-buildx" in script
    assert "BUILDX_VERSION=${_BUILDX_VERSION}" in build_step()["env"]
    # Negotiation, not a pinned API version: that would break when the daemon drops 1.41.
    assert "DOCKER_API_VERSION" not in (ROOT / "cloudbuild.yaml").read_text(encoding="utf-8").split("steps:")[1]


# ---------------------------------------------------------------- workflows


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_actions_are_pinned_by_commit_sha_with_their_version(name: str) -> None:
    uses = re.findall(r"uses:\s*(\S+)(.*)", WORKFLOWS[name].read_text(encoding="utf-8"))
    assert uses
    for action, comment in uses:
        assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", action), f"{action} is not pinned to a commit"
        assert re.fullmatch(r"\s*# v\d+(\.\d+)*", comment), f"{action} lacks a `# vX.Y.Z` comment"


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_least_permissions_and_timeouts(name: str) -> None:
    parsed = workflow(name)
    assert "permissions" in parsed
    assert parsed["permissions"] in ({}, {"contents": "read"})
    for job in parsed["jobs"].values():
        assert isinstance(job["timeout-minutes"], int)
        assert job.get("permissions", {}).get("contents", "read") == "read"


def test_ci_runs_the_readme_test_command_on_push_and_pull_request() -> None:
    parsed = workflow("ci")
    assert {"push", "pull_request"} <= set(triggers(parsed))
    runs = [step.get("run") for job in parsed["jobs"].values() for step in job["steps"]]
    assert "make test" in runs
    setups = {
        step["uses"].split("@")[0]: step.get("with", {}) for step in parsed["jobs"]["test"]["steps"] if "uses" in step
    }
    assert setups["actions/setup-python"]["python-version"] == "3.11"
    assert setups["actions/setup-node"]["node-version"] == "20"


def deploy_steps() -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = workflow("deploy")["jobs"]["release"]["steps"]
    return steps


def test_deploy_runs_on_version_tags_with_oidc_only_there() -> None:
    parsed = workflow("deploy")
    assert triggers(parsed) == {"push": {"tags": ["v*"]}}
    assert parsed["permissions"] == {}
    assert parsed["jobs"]["release"]["permissions"] == {"contents": "read", "id-token": "write"}
    auth = next(step for step in deploy_steps() if step.get("uses", "").startswith("google-github-actions/auth@"))
    assert set(auth["with"]) == {"workload_identity_provider", "service_account"}


def test_deploy_builds_then_canaries_then_promotes_10_50_100_and_rolls_back() -> None:
    runs = [step.get("run", "") for step in deploy_steps()]
    script = "\n".join(runs)
    assert "gcloud builds submit" in script and "--config cloudbuild.yaml" in script and "_TAG=$GIT_TAG" in script
    order = [
        "scripts/deploy.py deploy",
        'scripts/deploy.py smoke --url "$CANARY_URL"',
        "--percent 10",
        "--percent 50",
        "--percent 100",
        "scripts/deploy.py untag",
    ]
    positions = [script.index(marker) for marker in order]
    assert positions == sorted(positions)
    assert script.count("scripts/deploy.py check") == 3
    rollback = deploy_steps()[-1]
    assert "scripts/deploy.py rollback --to-revision" in rollback["run"]


def test_rollback_runs_on_failure_timeout_and_cancellation() -> None:
    rollback = deploy_steps()[-1]
    condition = rollback["if"].replace(" ", "")
    # A cancelled run (or a job cancelled at its timeout) skips `if: failure()` steps, leaving traffic
    # split; cancelled() runs them, and GitHub gives them 5 minutes after a cancellation.
    assert condition.startswith("(failure()||cancelled())&&")
    assert "steps.deploy.outputs.previous_revision!=''" in condition
    assert rollback["timeout-minutes"] <= 5
    # Tag cleanup after a checked release must not roll it back.
    untag = next(step for step in deploy_steps() if "scripts/deploy.py untag" in step.get("run", ""))
    assert untag["continue-on-error"] is True


def test_step_timeouts_fit_inside_the_jobs() -> None:
    # If the steps could outlast the job, the job timeout would cancel a step mid-way; with every step
    # bounded and the sum under the job's limit, a slow step fails on its own and the rollback runs.
    for name in WORKFLOWS:
        for job_name, job in workflow(name)["jobs"].items():
            if name != "deploy":
                continue
            timeouts = [step.get("timeout-minutes") for step in job["steps"]]
            assert all(isinstance(minutes, int) and minutes > 0 for minutes in timeouts), (job_name, timeouts)
            assert sum(timeouts) <= job["timeout-minutes"], (job_name, sum(timeouts), job["timeout-minutes"])


def test_builds_stage_the_source_in_the_bucket_the_build_account_reads() -> None:
    # Without --gcs-source-staging-dir gcloud copies the source (a gs:// one too) into
    # gs://<project>_cloudbuild, creating that bucket: the deployer cannot, the build account cannot read it.
    script = "\n".join(step.get("run", "") for step in deploy_steps())
    submits = [line for line in script.split("gcloud builds submit")[1:]]
    assert submits
    for submit in submits:
        command = submit.split("\n\n")[0]
        assert '--gcs-source-staging-dir "gs://$BUILD_SOURCES_BUCKET/source"' in command
        assert "--service-account" in command
    env = workflow("deploy")["jobs"]["release"]["env"]
    assert env["BUILD_SOURCES_BUCKET"] == "${{ vars.BUILD_SOURCES_BUCKET }}"
    outputs = (ROOT / "terraform" / "outputs.tf").read_text(encoding="utf-8")
    assert "BUILD_SOURCES_BUCKET           = google_storage_bucket.build_sources.name" in outputs


def test_canary_is_smoke_tested_through_the_load_balancer() -> None:
    steps = {step.get("name", ""): step for step in deploy_steps()}
    smoke = steps["Smoke-test the canary through the load balancer"]
    assert smoke["env"]["CANARY_URL"] == "${{ steps.deploy.outputs.canary_url }}"
    # No step talks to a run.app URL: with internal-and-load-balancer ingress they are unreachable.
    assert "run.app" not in WORKFLOWS["deploy"].read_text(encoding="utf-8")


def test_deploy_steps_never_interpolate_expressions_into_scripts() -> None:
    # Values reach scripts through env:, so a crafted tag or output cannot inject shell.
    for step in deploy_steps():
        assert "${{" not in step.get("run", ""), step.get("name")
