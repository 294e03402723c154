"""The README and the CLI stay in step with the settings class."""

from __future__ import annotations

import inspect
from pathlib import Path

from clipsearch.cli import serve
from clipsearch.service.settings import Settings, configuration_doc

ROOT = Path(__file__).resolve().parents[1]
ENV_ONLY = {"admin_token", "api_keys"}  # secrets do not belong on a command line


def test_the_configuration_page_is_generated_from_the_settings() -> None:
    page = (ROOT / "docs/configuration.md").read_text()
    assert page == configuration_doc(), "docs/configuration.md is stale: python -m clipsearch.service.settings > it"
    missing = [n for n in Settings.model_fields if f"`CLIPSEARCH_{n.upper()}`" not in page]
    assert not missing


def test_readme_stays_a_users_page() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 12_500, "README.md is for users: move details to docs/"
    for page in ("docs/architecture.md", "docs/configuration.md", "docs/benchmarks.md", "docs/operations.md"):
        assert (ROOT / page).is_file() and page in readme, f"README does not link {page}"


def test_every_setting_has_a_serve_flag() -> None:
    flags = set(inspect.signature(serve).parameters)
    missing = set(Settings.model_fields) - ENV_ONLY - flags
    assert not missing, f"clipsearch serve lacks flags for {missing}"
    unknown = flags - set(Settings.model_fields)
    assert not unknown, f"flags with no setting behind them: {unknown}"


def test_readme_starts_with_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = readme.split("```bash")[1:3]
    assert "clipsearch" in blocks[0] and "pip install" in blocks[0]
    assert "pytest" in blocks[1]
    ci = (ROOT / ".ci/run").read_text()
    assert blocks[1].strip().splitlines()[0] in ci  # CI runs exactly the README's test command
