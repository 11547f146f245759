"""Tests that use ../shared find it from the repository root and never skip silently (issue 16)."""

from __future__ import annotations

import conftest
import pytest


def test_shared_folder_is_next_to_the_repository_root(monkeypatch):
    monkeypatch.delenv(conftest.SHARED_ENV, raising=False)
    root = conftest.repo_root()
    assert (root / "pyproject.toml").is_file() and (root / "tests" / "conftest.py").is_file()
    assert conftest.shared_dir() == root.parent / "shared"


def test_missing_shared_data_skips_naming_the_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(conftest.SHARED_ENV, raising=False)
    monkeypatch.setattr(conftest, "repo_root", lambda: tmp_path / "repo")
    with pytest.raises(pytest.skip.Exception) as info:
        conftest.require_shared("lincs-a549")
    msg = str(info.value)
    assert str(tmp_path / "shared" / "data" / "lincs-a549") in msg and conftest.SHARED_ENV in msg


def test_env_override_is_used_and_a_promised_folder_must_exist(tmp_path, monkeypatch):
    monkeypatch.setenv(conftest.SHARED_ENV, str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match="lincs-a549"):
        conftest.require_shared("lincs-a549")
    (tmp_path / "data" / "lincs-a549").mkdir(parents=True)
    assert conftest.require_shared("lincs-a549") == tmp_path / "data" / "lincs-a549"
