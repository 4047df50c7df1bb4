"""The effect registry is the one source: settings, model configs and docs agree with it, and no module
of the service needs another imported first (no import cycles), nor pulls diffusers in with the registry."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from effects import DIFFUSION_EFFECTS, EFFECTS, diffusion_spec
from effects.base import Effect
from effects.diffusion_base import MODEL_CONFIGS_DIR, DiffusionSpec
from service.settings import Settings
from tests.support.weights import TINY_CONFIG

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("effects", "service", "cache")

# Imports each named module with every module of PACKAGES forgotten first, so each import starts from
# nothing of ours, as in a fresh interpreter; third-party libraries (torch & co., which never import
# ours) stay loaded, which keeps the whole check to one interpreter start instead of one per module.
IMPORT_EACH_ALONE = textwrap.dedent(
    """
    import importlib, sys, traceback
    packages = tuple(sys.argv[1].split(","))
    failures = []
    for name in sys.argv[2:]:
        for loaded in [m for m in sys.modules if m.split(".")[0] in packages]:
            del sys.modules[loaded]
        try:
            importlib.import_module(name)
        except Exception:
            failures.append(f"{name}: " + traceback.format_exc(limit=-2).strip().splitlines()[-1])
    print("\\n".join(failures))
    sys.exit(1 if failures else 0)
    """
)


def module_names(root: Path, packages: tuple[str, ...]) -> list[str]:
    names = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def import_each_alone(root: Path, packages: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", IMPORT_EACH_ALONE, ",".join(packages), *module_names(root, packages)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_every_module_imports_alone() -> None:
    names = module_names(ROOT, PACKAGES)
    assert {"effects", "effects.diffusion_base", "effects.weights", "service.settings", "cache.store"} <= set(names)
    result = import_each_alone(ROOT, PACKAGES)
    assert result.returncode == 0, f"modules that fail to import alone:\n{result.stdout}{result.stderr}"


def test_the_import_check_catches_a_cycle(tmp_path: Path) -> None:
    # Two modules that each need a name of the other at import: fine when either is imported first by a
    # third module that happens to run earlier, an ImportError when one is imported alone.
    package = tmp_path / "loop"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "first.py").write_text("from loop.second import LATER\nEARLY = 1\n")
    (package / "second.py").write_text("from loop.first import EARLY\nLATER = 2\n")
    result = import_each_alone(tmp_path, ("loop",))
    assert result.returncode == 1
    assert "loop.first: ImportError" in result.stdout and "partially initialized module" in result.stdout


def test_the_registry_does_not_import_the_diffusion_libraries() -> None:
    # Start-up serves the cutout before diffusers and transformers are imported (tests/test_startup.py):
    # the registry, the diffusion runtime and the engine must not import them at module level.
    for module in ("effects", "effects.diffusion", "effects.engine", "service.app"):
        result = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", f"import {module}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
        assert "torch" in imported, "the check reads -X importtime's output"
        heavy = sorted(name for name in imported if name.split(".")[0] in {"diffusers", "transformers"})
        assert not heavy, f"import {module} pulls in {heavy[:5]}"
        # The weight fetcher is build-time tooling (network, the Hub): the serving code never loads it.
        assert "effects.weights" not in imported, f"import {module} pulls in the weight fetcher"


# --- The registry's entries ------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(EFFECTS))
def test_each_entry_is_named_by_its_key_and_diffusion_effects_carry_their_spec(name: str) -> None:
    effect = EFFECTS[name]
    assert effect.name == name
    if effect.kind == "diffusion":
        assert name in DIFFUSION_EFFECTS
        assert isinstance(effect.diffusion, DiffusionSpec) and diffusion_spec(name) is effect.diffusion
        assert effect.model == name, "the pipeline's directory under MODELS_DIR is the effect's name"
        assert "/" in effect.diffusion.hub_id, "a Hub repository id: owner/name"
    else:
        assert name not in DIFFUSION_EFFECTS
        with pytest.raises(ValueError, match="not a diffusion effect; diffusion effects are upscale"):
            diffusion_spec(name)


@pytest.mark.parametrize("name", DIFFUSION_EFFECTS)
def test_each_diffusion_effect_has_its_production_and_tiny_configs(name: str) -> None:
    directory = MODEL_CONFIGS_DIR / name
    files = {path.name for path in directory.glob("*.json")}
    assert {"unet.json", "vae.json", TINY_CONFIG} <= files
    assert files & {"text_encoder.json", "text_encoder_2.json"}


def test_a_mismatched_entry_is_refused() -> None:
    spec = diffusion_spec("comic")
    params = EFFECTS["comic"].params
    with pytest.raises(ValueError, match="a diffusion spec goes with kind 'diffusion'"):
        Effect(name="x", kind="model", description="", version=1, params=params, diffusion=spec)
    with pytest.raises(ValueError, match="a diffusion spec goes with kind 'diffusion'"):
        Effect(name="x", kind="diffusion", description="", version=1, params=params)


def test_settings_load_every_registered_diffusion_effect_by_default() -> None:
    assert Settings().diffusion_effects == list(DIFFUSION_EFFECTS)
    with pytest.raises(ValueError, match="unknown diffusion effect popart; choose from upscale, enhance"):
        Settings(diffusion_effects=["comic", "popart"])


# --- The docs' tables -------------------------------------------------------------------------------


def table_rows(path: Path, heading: str) -> list[list[str]]:
    """The cells of the first table after `heading` in a Markdown file (header and rule left out)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = lines.index(heading)
    rows: list[list[str]] = []
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            break
    return rows[2:]


def unquote(cell: str) -> str:
    return cell.strip("`* ")


def test_the_api_docs_list_every_effect_with_its_kind() -> None:
    rows = table_rows(ROOT / "docs" / "API.md", "## Effects")
    assert [(unquote(row[0]), row[1]) for row in rows] == [(name, effect.kind) for name, effect in EFFECTS.items()]


def test_the_diffusion_docs_list_every_diffusion_effect_with_its_pipeline_and_weights() -> None:
    rows = table_rows(ROOT / "docs" / "diffusion.md", "# Diffusion effects")
    assert [unquote(row[0]) for row in rows] == list(DIFFUSION_EFFECTS)
    for row in rows:
        spec = diffusion_spec(unquote(row[0]))
        assert unquote(row[1]) == spec.pipeline_class_name
        assert re.findall(r"`([^`]+)`", row[2]) == [spec.hub_id, *([spec.vae_hub_id] if spec.vae_hub_id else [])]


def numbers(cell: str) -> tuple[float, ...]:
    """'7.5 (1–15)' -> (7.5, 1.0, 15.0); '—' -> ()."""
    return tuple(float(value) for value in re.findall(r"\d+(?:\.\d+)?", cell))


def test_the_diffusion_docs_show_each_effects_defaults_and_bounds() -> None:
    rows = table_rows(ROOT / "docs" / "diffusion.md", "### Parameters")
    columns = ("steps", "guidance_scale", "strength", "noise_level")
    assert [unquote(row[0]) for row in rows] == list(DIFFUSION_EFFECTS)
    for row in rows:
        properties: dict[str, Any] = EFFECTS[unquote(row[0])].params.model_json_schema()["properties"]
        for column, cell in zip(columns, row[1:], strict=True):
            field = properties.get(column)
            expected = () if field is None else (field["default"], field["minimum"], field["maximum"])
            assert numbers(cell) == expected, f"{row[0]}.{column}: the docs say {cell!r}"


def test_the_readme_names_the_default_diffusion_effects() -> None:
    rows = table_rows(ROOT / "README.md", "## Configuration")
    (default,) = [unquote(row[1]) for row in rows if unquote(row[0]) == "CUTOUT_DIFFUSION_EFFECTS"]
    assert default == ",".join(DIFFUSION_EFFECTS)
