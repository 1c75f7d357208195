"""Source parsing, default names, plugin-name validation and the allowlist."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from registry.plugins import (
    InvalidSource,
    PluginSource,
    SourceDenied,
    SourceSettings,
    check_allowed,
    default_plugin_name,
    parse_source,
    validate_plugin_name,
)

SETTINGS = SourceSettings()
SHA = "0123456789abcdef0123456789abcdef01234567"


def test_parse_file_source_resolves_absolute_path(tmp_path: Path) -> None:
    (tmp_path / "plugins" / "tool").mkdir(parents=True)
    src = parse_source(f"file://{tmp_path}/plugins/../plugins/tool", SETTINGS)
    assert src.kind == "file"
    assert src.location == str(tmp_path / "plugins" / "tool")
    assert src.raw == f"file://{tmp_path}/plugins/tool"
    assert src.ref is None
    assert src.subdir is None


def test_parse_file_source_follows_symlinked_parent_for_location(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    src = parse_source(f"file://{tmp_path}/link", SETTINGS)
    assert src.location == str(tmp_path / "real")


def test_parse_git_url_with_branch() -> None:
    src = parse_source("git+file:///tmp/repo.git#main", SETTINGS)
    assert src == PluginSource(
        raw="git+file:///tmp/repo.git#main",
        kind="git",
        location="file:///tmp/repo.git",
        ref="main",
        subdir=None,
    )


def test_parse_git_https_url_with_tag() -> None:
    src = parse_source("git+https://Host.Example.com/o/r.git#v1.2", SETTINGS)
    assert src.location == "https://host.example.com/o/r.git"
    assert src.ref == "v1.2"
    assert src.raw == "git+https://host.example.com/o/r.git#v1.2"


def test_parse_git_url_without_ref_defaults_to_head() -> None:
    src = parse_source("git+https://host/o/r.git", SETTINGS)
    assert src.ref == "HEAD"
    assert src.raw.endswith("#HEAD")


def test_parse_git_url_with_full_sha_lowercases_it() -> None:
    src = parse_source(f"git+ssh://git@host/o/r.git#{SHA.upper()}", SETTINGS)
    assert src.ref == SHA
    assert src.location == "ssh://git@host/o/r.git"


def test_parse_git_scp_like_url() -> None:
    src = parse_source("git+git@host.example.com:o/r.git#dev", SETTINGS)
    assert src.location == "git@host.example.com:o/r.git"
    assert default_plugin_name(src) == "r"


def test_parse_github_shorthand_with_subdir() -> None:
    src = parse_source("github://acme/mono.git/plugins/lint#v2", SETTINGS)
    assert src.kind == "git"
    assert src.location == "https://github.com/acme/mono.git"
    assert src.ref == "v2"
    assert src.subdir == "plugins/lint"
    assert src.raw == "github://acme/mono/plugins/lint#v2"


def test_parse_github_uses_configured_base() -> None:
    settings = SourceSettings(github_base="file:///tmp/xyz/")
    src = parse_source("github://acme/tools", settings)
    assert src.location == "file:///tmp/xyz/acme/tools.git"
    assert src.ref == "HEAD"
    assert src.subdir is None


def test_parse_gitea_shorthand_uses_configured_scheme() -> None:
    settings = SourceSettings(gitea_scheme="http")
    src = parse_source("gitea://Git.Example.com:3000/acme/tools/sub#main", settings)
    assert src.location == "http://git.example.com:3000/acme/tools.git"
    assert src.subdir == "sub"
    assert src.raw == "gitea://git.example.com:3000/acme/tools/sub#main"


@pytest.mark.parametrize(
    "raw",
    [
        "",
        " file:///tmp/x",
        "ftp://host/x",
        "http://host/o/r.git",
        "/abs/path",
        "relative/dir",
        "file://relative/dir",
        "file:tmp/x",
        "file:///tmp/x#main",
        "git+",
        "git+relative/path.git#main",
        "git+ext::sh -c touch% /tmp/pwned#main",
        "git+fd::7#main",
        "git+-uhttps://host/r.git",
        "git+ssh://-oProxyCommand=x@host/r.git",
        "git+-oProxyCommand=x@host:r.git",
        "git+https://host/a/../b/r.git#main",
        "git+https://host/a/%2e%2e/b/r.git#main",
        "git+https://host/#main",
        "git+file://host/tmp/r.git#main",
        "github://acme",
        "github://acme/",
        "github://-acme/tools",
        "github://acme/.git",
        "gitea://host/acme",
        "gitea://-host/acme/tools",
        "svn://host/repo",
        "file:///tmp/x\n",
    ],
)
def test_parse_rejects_unsupported_or_malformed_sources(raw: str) -> None:
    with pytest.raises(InvalidSource) as exc_info:
        parse_source(raw, SETTINGS)
    assert exc_info.value.code == "invalid_source"
    assert exc_info.value.transient is False


@pytest.mark.parametrize(
    "ref",
    [
        "--upload-pack=x",
        "-main",
        "a..b",
        "has space",
        "tab\there",
        "a~1",
        "a^",
        "a:b",
        "a?",
        "a*",
        "a[",
        "a\\b",
        "/main",
        "main/",
        "a//b",
        "main.",
        "main.lock",
        ".hidden",
        "a/.b",
        "a@{1}",
        "@",
        "",
        "x" * 300,
    ],
)
def test_parse_rejects_invalid_refs(ref: str) -> None:
    with pytest.raises(InvalidSource):
        parse_source(f"git+https://host/o/r.git#{ref}", SETTINGS)


@pytest.mark.parametrize(
    "raw",
    [
        "github://acme/mono/../etc#main",
        "github://acme/mono/a/../../b#main",
        "github://acme/mono/./a#main",
        "github://acme/mono//a#main",
        "github://acme/mono/a/#main",
        "gitea://host/acme/mono/..#main",
    ],
)
def test_parse_rejects_subdir_escapes_and_empty_segments(raw: str) -> None:
    with pytest.raises(InvalidSource):
        parse_source(raw, SETTINGS)


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        ("file:///srv/plugins/linter", "linter"),
        ("git+file:///tmp/repos/tool.git#main", "tool"),
        ("git+https://host/o/other-tool#v1", "other-tool"),
        ("github://acme/mono#main", "mono"),
        ("github://acme/mono/plugins/fmt#main", "fmt"),
        ("gitea://host/acme/helper.git#main", "helper"),
    ],
)
def test_default_plugin_name_is_last_path_segment(raw: str, name: str) -> None:
    assert default_plugin_name(parse_source(raw, SETTINGS)) == name


@pytest.mark.parametrize("name", ["a", "lint", "my-plugin_2.0", "A" * 64])
def test_validate_plugin_name_accepts_safe_names(name: str) -> None:
    assert validate_plugin_name(name) == name


@pytest.mark.parametrize(
    "name", ["", ".", "..", "../x", "a/b", ".hidden", "-x", "a b", "A" * 65, "x\n"]
)
def test_validate_plugin_name_rejects_unsafe_names(name: str) -> None:
    with pytest.raises(InvalidSource) as exc_info:
        validate_plugin_name(name)
    assert exc_info.value.code == "invalid_plugin_name"


def _allowed(raw: str, *allowlist: str) -> bool:
    settings = SourceSettings(allowlist=allowlist)
    try:
        check_allowed(parse_source(raw, settings), settings)
    except SourceDenied:
        return False
    return True


def test_allowlist_empty_denies_everything() -> None:
    assert not _allowed("github://acme/tools#main")
    assert not _allowed("file:///srv/plugins/x")


def test_allowlist_star_allows_everything() -> None:
    assert _allowed("github://acme/tools#main", "*")
    assert _allowed("git+https://anywhere/r.git", "*")
    assert _allowed("file:///srv/plugins/x", "*")


def test_allowlist_prefix_without_slash_matches_only_at_boundary(tmp_path: Path) -> None:
    base = f"file://{tmp_path}/plugins"
    assert _allowed(f"{base}", base)
    assert _allowed(f"{base}/tool", base)
    assert not _allowed(f"file://{tmp_path}/plugins-evil", base)
    assert not _allowed(f"file://{tmp_path}/pluginsx/tool", base)


def test_allowlist_prefix_with_slash_matches_children(tmp_path: Path) -> None:
    entry = f"file://{tmp_path}/plugins/"
    assert _allowed(f"file://{tmp_path}/plugins/tool", entry)
    assert not _allowed(f"file://{tmp_path}/plugins-evil/tool", entry)


def test_allowlist_dotdot_is_normalised_before_matching(tmp_path: Path) -> None:
    entry = f"file://{tmp_path}/plugins/"
    assert not _allowed(f"file://{tmp_path}/plugins/../etc", entry)
    assert not _allowed(f"git+file://{tmp_path}/plugins/../other.git#main", f"git+{entry}")


def test_allowlist_symlink_out_of_allowed_dir_is_denied(tmp_path: Path) -> None:
    (tmp_path / "plugins").mkdir()
    (tmp_path / "secret").mkdir()
    (tmp_path / "plugins" / "sneaky").symlink_to(tmp_path / "secret")
    assert not _allowed(f"file://{tmp_path}/plugins/sneaky", f"file://{tmp_path}/plugins/")


def test_allowlist_github_matches_shorthand_form_only() -> None:
    assert _allowed("github://acme/tools#main", "github://acme/")
    assert _allowed("github://acme/tools/sub#main", "github://acme/tools")
    assert not _allowed("github://acme-evil/tools#main", "github://acme")
    assert not _allowed("github://acme/tools-evil#main", "github://acme/tools")
    assert not _allowed("github://acme/tools#main", "git+https://github.com/acme/")


def test_allowlist_git_url_matches_git_plus_form() -> None:
    assert _allowed("git+https://git.example.com/acme/r.git#main", "git+https://git.example.com/")
    assert _allowed("git+https://git.example.com/acme/r.git#main", "git+https://git.example.com")
    assert not _allowed(
        "git+https://git.example.com.evil.net/acme/r.git#main", "git+https://git.example.com"
    )
    assert not _allowed("git+https://git.example.com/acme/r.git#main", "https://git.example.com/")


def test_allowlist_gitea_prefix() -> None:
    assert _allowed("gitea://git.example.com/acme/tools#main", "gitea://git.example.com/acme/")
    assert not _allowed("gitea://git.example.com/other/tools#main", "gitea://git.example.com/acme/")


def test_allowlist_rejects_tampered_source_fields() -> None:
    settings = SourceSettings(allowlist=("github://acme/",))
    src = parse_source("github://acme/tools#main", settings)
    forged = dataclasses.replace(src, location="https://evil.example.com/x.git")
    with pytest.raises(SourceDenied) as exc_info:
        check_allowed(forged, settings)
    assert exc_info.value.code == "source_denied"
    assert exc_info.value.transient is False
