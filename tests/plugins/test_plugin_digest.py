"""tree_digest: what changes the digest and what does not."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from registry.plugins import FetchFailed, tree_digest


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "mod.py").write_text("x = 1\n")
    (root / "README").write_text("hello\n")
    return root


def test_digest_is_stable_hex(tree: Path) -> None:
    digest = tree_digest(tree)
    assert digest == tree_digest(tree)
    assert len(digest) == 64
    int(digest, 16)


def test_digest_ignores_generated_files(tree: Path) -> None:
    before = tree_digest(tree)
    (tree / "__pycache__").mkdir()
    (tree / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\x00")
    (tree / "pkg" / "__pycache__").mkdir()
    (tree / "pkg" / "__pycache__" / "mod.pyc").write_bytes(b"\x01")
    (tree / "pkg" / "old.pyc").write_bytes(b"\x02")
    (tree / "pkg" / "old.pyo").write_bytes(b"\x03")
    (tree / "tree.egg-info").mkdir()
    (tree / "tree.egg-info" / "PKG-INFO").write_text("Name: tree\n")
    (tree / ".git").mkdir()
    (tree / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    assert tree_digest(tree) == before


def test_digest_equal_for_copies_at_different_paths(tree: Path, tmp_path: Path) -> None:
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(tree, copy)
    assert tree_digest(copy) == tree_digest(tree)


def test_digest_changes_when_content_changes(tree: Path) -> None:
    before = tree_digest(tree)
    (tree / "pkg" / "mod.py").write_text("x = 2\n")
    assert tree_digest(tree) != before


def test_digest_changes_when_exec_bit_changes(tree: Path) -> None:
    before = tree_digest(tree)
    (tree / "README").chmod(0o755)
    assert tree_digest(tree) != before


def test_digest_changes_when_file_renamed(tree: Path) -> None:
    before = tree_digest(tree)
    (tree / "README").rename(tree / "README.md")
    assert tree_digest(tree) != before


def test_digest_changes_when_file_added(tree: Path) -> None:
    before = tree_digest(tree)
    (tree / "pkg" / "empty.py").write_bytes(b"")
    assert tree_digest(tree) != before


def test_digest_refuses_symlinks(tree: Path) -> None:
    (tree / "pkg" / "link").symlink_to("mod.py")
    with pytest.raises(FetchFailed) as exc_info:
        tree_digest(tree)
    assert exc_info.value.code == "symlink_refused"


def test_digest_refuses_symlinked_root(tree: Path, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(tree)
    with pytest.raises(FetchFailed) as exc_info:
        tree_digest(link)
    assert exc_info.value.code == "symlink_refused"
