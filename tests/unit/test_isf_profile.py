"""ISF -> Profile: answers match pahole, errors name what was asked, the cache is safe."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_btf import HOST_BTF, need_host_btf_and_pahole, pahole_layout
from test_isf_build import BANNER, build_sample

from vmishell.errors import ProfileError, SymbolNotFound
from vmishell.symbols import isf as isf_module
from vmishell.symbols.btf import BtfKind, parse_btf
from vmishell.symbols.isf_build import KNOWN_SYMBOL_TYPES, build_isf, write_isf
from vmishell.symbols.profile import Field, Profile, TypeRef, load_profile


@pytest.fixture(scope="module")
def host_isf_file(tmp_path_factory) -> Path:
    """The host kernel's BTF as an ISF .json.xz, with per-CPU and well-known symbols."""
    need_host_btf_and_pahole()
    data = HOST_BTF.read_bytes()
    btf = parse_btf(data)
    symbols = {
        btf[v.type].name: v.offset for t in btf if t.kind == BtfKind.DATASEC for v in t.extra
    }
    for i, name in enumerate(sorted(KNOWN_SYMBOL_TYPES)):
        symbols[name] = 0xFFFFFFFF82000000 + i * 0x1000
    isf = build_isf(data, symbols, banner=BANNER)
    return write_isf(isf, tmp_path_factory.mktemp("isf") / "host-6.x.json.xz")


@pytest.fixture(scope="module")
def host_cache(tmp_path_factory) -> Path:
    """One cache for the read-only host tests, so the 0.3 s cold load happens once."""
    return tmp_path_factory.mktemp("host-cache")


@pytest.fixture
def sample_file(tmp_path: Path) -> Path:
    return write_isf(build_sample(banner=b"Linux version 1.2.3\n"), tmp_path / "sample.json")


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


# -- answers --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["task_struct", "mm_struct", "list_head", "page"])
def test_profile_offsets_and_sizes_equal_pahole(host_isf_file, host_cache, name) -> None:
    profile = load_profile(host_isf_file, cache_dir=host_cache)
    size, members = pahole_layout(name)
    assert profile.size_of(name) == size
    got = {}
    for f in profile.fields(name):
        if f.type.kind == "bitfield":
            got[f.name] = (f.offset, f.type.bit_position, profile.size_of(f.type))
        else:
            got[f.name] = (f.offset, None, profile.size_of(f.type))
    assert got == members


def test_profile_knows_its_kernel(host_isf_file, host_cache) -> None:
    profile = load_profile(host_isf_file, cache_dir=host_cache)
    assert profile.name == "host-6.x"
    assert (profile.pointer_size, profile.endian) == (8, "little")
    assert profile.banner == BANNER
    assert profile.symbol_type("init_task") == TypeRef("struct", "task_struct")
    assert profile.symbol_type("runqueues") == TypeRef("struct", "rq")
    assert profile.offset_of("mm_struct", "pgd") == pahole_layout("mm_struct")[1]["pgd"][0]
    se = pahole_layout("task_struct")[1]["se"][0]
    assert profile.offset_of("task_struct", "se.vruntime") == se + profile.offset_of(
        "sched_entity", "vruntime"
    )
    assert profile.enum_value("pid_type", "PIDTYPE_TGID") == 1
    assert profile.enum_name("pid_type", 0) == "PIDTYPE_PID"
    assert profile.size_of("pointer") == 8 and profile.size_of("unsigned int") == 4
    assert profile.size_of("enum pid_type") == 4 and profile.size_of("struct list_head") == 16
    assert profile.has_type("task_struct") and not profile.has_type("no_such_type")
    assert "task_struct" in profile.type_names()


def test_fields_of_the_sample_struct(sample_file, cache_dir) -> None:
    profile = load_profile(sample_file, cache_dir=cache_dir)
    assert [f.name for f in profile.fields("thing")] == [
        "a", "b", "st", "flag", "comm", "x", "y", "v", "cb", "o",
    ]  # fmt: skip
    assert profile.field("thing", "flag") == Field(
        "flag",
        1,
        TypeRef("bitfield", "_Bool", TypeRef("base", "_Bool"), bit_position=2, bit_length=1),
    )
    assert profile.field("thing", "x").offset == 20  # flattened out of the anonymous union
    assert profile.field("thing", "comm").type == TypeRef(
        "array", subtype=TypeRef("base", "char"), count=16
    )
    assert profile.offset_of("thing", "comm[3]") == 7
    assert str(profile.field("thing", "cb").type) == "function *"
    assert profile.has_field("thing", "y") and not profile.has_field("thing", "z")
    assert not profile.has_field("nothing", "y")
    assert profile.field("thing", "st").type.subtype == TypeRef("enum", "state")
    assert profile.enum_value("state", "S_NEG") == -1
    assert profile.enum_name("state", 7) is None
    assert profile.banner == b"Linux version 1.2.3\n"


def test_symbols_answer_addresses_types_and_nearest_names(sample_file, cache_dir) -> None:
    profile = load_profile(sample_file, cache_dir=cache_dir)
    assert profile.symbol_address("_text") == 0xFFFFFFFF81000000
    assert profile.has_symbol("init_task") and not profile.has_symbol("nope")
    assert profile.symbol_type("init_task") is None
    assert profile.symbol_at(0xFFFFFFFF81000010) == ("_text", 0x10)
    assert profile.symbol_at(0x40) == ("runqueue_thing", 0)
    assert profile.symbol_at(0x3F) is None
    assert profile.symbol_names()[0] == "runqueue_thing"


def test_what_is_missing_raises_symbol_not_found_naming_the_profile(sample_file, cache_dir) -> None:
    profile = load_profile(sample_file, cache_dir=cache_dir)
    cases = [
        (lambda: profile.offset_of("thing", "foo"), "thing has no field 'foo' in profile sample"),
        (lambda: profile.field("nothing", "a"), "no struct or union 'nothing' in profile sample"),
        (lambda: profile.symbol_address("nope"), "no symbol 'nope' in profile sample"),
        (lambda: profile.symbol_type("nope"), "no symbol 'nope'"),
        (lambda: profile.size_of("nothing"), "no type 'nothing' in profile sample"),
        (lambda: profile.enum_value("state", "S_TWO"), "enum state has no constant 'S_TWO'"),
        (lambda: profile.enum_value("nostate", "S"), "no enum 'nostate'"),
        (
            lambda: profile.offset_of("thing", "o.x"),
            r"thing.o.x: o is a struct opaque \*, not an embedded",
        ),
        (lambda: profile.offset_of("thing", "a[1]"), "not an array"),
    ]
    for call, message in cases:
        with pytest.raises(SymbolNotFound, match=message):
            call()
    assert issubclass(SymbolNotFound, ProfileError)


def test_profile_from_an_isf_dict_needs_no_file() -> None:
    profile = Profile.from_isf(build_sample(), "fresh")
    assert profile.offset_of("thing", "v") == 28
    assert repr(profile) == "<Profile fresh (64-bit little, ISF 6.2.0)>"


def test_a_profile_compiling_types_on_demand_answers_as_the_eager_one() -> None:
    isf = build_sample()
    eager = Profile.from_isf(isf, "eager")
    lazy = Profile.from_isf(isf, "lazy", lazy_types=True)
    assert lazy.type_names() == eager.type_names()
    for name in eager.type_names():
        if eager.has_type(name) and name in isf["user_types"]:
            assert lazy.has_type(name)
            assert lazy.fields(name) == eager.fields(name)
            assert lazy.size_of(name) == eager.size_of(name)
    assert lazy.symbol_names() == eager.symbol_names()


def test_a_malformed_type_of_a_lazy_profile_fails_when_asked_for() -> None:
    isf = build_sample()
    isf["user_types"]["thing"]["fields"] = {"v": {"offset": 28}}  # a field without a type
    profile = Profile.from_isf(isf, "lazy", lazy_types=True)  # nothing compiled yet
    with pytest.raises(ProfileError, match="thing"):
        profile.fields("thing")
    with pytest.raises(ProfileError, match="thing"):
        Profile.from_isf(isf, "eager")


def _mutate(value, data):
    """Replace one randomly chosen node of a JSON document with junk."""
    if isinstance(value, dict) and value and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(value)))
        return {**value, key: _mutate(value[key], data)}
    if isinstance(value, list) and value and data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(value) - 1))
        return [*value[:i], _mutate(value[i], data), *value[i + 1 :]]
    return data.draw(st.sampled_from([None, "x", -1, 2**70, 1.5, [], {}, {"kind": "pointer"}]))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_a_damaged_isf_raises_only_profile_errors(data) -> None:
    isf = json.loads(json.dumps(build_sample(banner=b"Linux version 1\n")))
    for _ in range(data.draw(st.integers(1, 3))):
        isf = _mutate(isf, data)
    lazy = data.draw(st.booleans())  # types compiled up front, or each when first asked for
    try:
        profile = Profile.from_isf(isf, "damaged", lazy_types=lazy)
        for struct_name in profile.type_names():
            if profile.has_type(struct_name):
                with contextlib.suppress(SymbolNotFound):
                    for f in profile.fields(struct_name):
                        profile.size_of(f.type)
                        profile.offset_of(struct_name, f.name)
        for name in profile.symbol_names():
            profile.symbol_type(name), profile.symbol_at(profile.symbol_address(name))
        with contextlib.suppress(SymbolNotFound):
            profile.enum_value("state", "S_ONE"), profile.enum_name("state", 1)
    except ProfileError:
        pass


# -- formats and versions ---------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".json.gz", ".json.xz"])
def test_any_compression_loads(tmp_path, cache_dir, suffix) -> None:
    path = write_isf(build_sample(), tmp_path / f"k{suffix}")
    assert load_profile(path, cache_dir=cache_dir).offset_of("thing", "o") == 40


@pytest.mark.parametrize("version", ["4.1.0", "7.0.0", "2.0.0"])
def test_other_schema_major_versions_are_rejected_naming_version_and_file(
    tmp_path, cache_dir, version
) -> None:
    isf = build_sample()
    isf["metadata"]["format"] = version
    path = write_isf(isf, tmp_path / "old.json")
    with pytest.raises(ProfileError, match=rf"ISF {path} has format version {version}; only 6"):
        load_profile(path, cache_dir=cache_dir)


def test_broken_isf_files_raise_profile_error(tmp_path, cache_dir) -> None:
    (tmp_path / "a.json").write_text("{not json")
    (tmp_path / "b.json").write_text(json.dumps({"metadata": {}}))
    (tmp_path / "c.json.xz").write_bytes(b"\xfd7zXZ\0garbage")
    (tmp_path / "d.json").write_text(json.dumps({"metadata": {"format": "6.2.0"}}))
    for name, message in [
        ("a.json", "is not valid JSON"),
        ("b.json", "has no metadata.format"),
        ("c.json.xz", "corrupt or truncated"),
        ("d.json", "lacks its 'base_types' table"),
        ("missing.json", "cannot read ISF"),
    ]:
        with pytest.raises(ProfileError, match=message):
            load_profile(tmp_path / name, cache_dir=cache_dir)


# -- the cache ----------------------------------------------------------------------------


def _answers(profile: Profile) -> tuple:
    return (
        profile.size_of("task_struct"),
        profile.fields("task_struct"),
        profile.fields("page"),
        profile.symbol_address("init_task"),
        profile.symbol_type("init_mm"),
        profile.enum_value("pid_type", "PIDTYPE_MAX"),
        profile.banner,
    )


def test_a_cached_load_parses_nothing_and_answers_the_same(
    host_isf_file, cache_dir, monkeypatch
) -> None:
    """The second load comes from the compiled cache: the ISF is neither read nor parsed.

    (How fast that is lives in benchmarks/, not here.)
    """
    from vmishell.symbols import profile as profile_module

    cold = load_profile(host_isf_file, cache_dir=cache_dir)

    def no_parse(*_args, **_kwargs):
        raise AssertionError("a cached profile was parsed again")

    monkeypatch.setattr(profile_module, "parse_isf", no_parse)
    monkeypatch.setattr(profile_module, "compile_isf", no_parse)
    warm = load_profile(host_isf_file, cache_dir=cache_dir)
    assert _answers(warm) == _answers(cold)
    entries = sorted(p.name for p in cache_dir.iterdir())
    assert len(entries) == 2 and entries[0].endswith(".vmiprof") and entries[1].startswith("stat-")


def test_the_xdg_cache_home_is_the_default(sample_file, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    load_profile(sample_file)
    assert list((tmp_path / "xdg" / "vmishell" / "profiles").glob("*.vmiprof"))


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) // 2],  # truncated
        lambda b: b[:-10] + b"x" * 10,  # payload changed
        lambda b: b"garbage",  # not an entry at all
        lambda b: b[:12] + bytes([b[12] ^ 0xFF]) + b[13:],  # header damaged
    ],
)
def test_a_corrupt_cache_entry_is_ignored_and_rebuilt(sample_file, cache_dir, damage) -> None:
    good = load_profile(sample_file, cache_dir=cache_dir)
    (entry,) = cache_dir.glob("*.vmiprof")
    original = entry.read_bytes()
    entry.write_bytes(damage(original))
    again = load_profile(sample_file, cache_dir=cache_dir)
    assert again.fields("thing") == good.fields("thing")
    assert isf_module.ProfileCache(cache_dir).get(entry.stem) is not None  # rewritten whole


def test_a_garbage_fingerprint_file_is_ignored(sample_file, cache_dir) -> None:
    load_profile(sample_file, cache_dir=cache_dir)
    for stat_file in cache_dir.glob("stat-*"):
        stat_file.write_bytes(b"\x00\x01garbage")
    assert load_profile(sample_file, cache_dir=cache_dir).offset_of("thing", "v") == 28


def test_an_unchanged_file_is_not_rehashed_once_its_fingerprint_is_old_enough(
    sample_file, cache_dir, monkeypatch
) -> None:
    monkeypatch.setattr(isf_module, "_RACY_SECONDS", 0.0)
    load_profile(sample_file, cache_dir=cache_dir)

    def no_hashing(path):
        raise AssertionError("hashed an unchanged file")

    monkeypatch.setattr(isf_module, "_sha256_file", no_hashing)
    assert load_profile(sample_file, cache_dir=cache_dir).offset_of("thing", "v") == 28


def test_a_file_edited_in_place_with_the_same_size_and_mtime_is_reread(
    sample_file, cache_dir, monkeypatch
) -> None:
    monkeypatch.setattr(isf_module, "_RACY_SECONDS", 0.0)
    assert load_profile(sample_file, cache_dir=cache_dir).offset_of("thing", "v") == 28
    text = sample_file.read_text()
    st = sample_file.stat()
    v_at = '"v":{"type":{"kind":"base","name":"unsigned int"},"offset":'
    edited = text.replace(v_at + "28}", v_at + "29}")
    assert edited != text and len(edited) == len(text)
    sample_file.write_text(edited)
    os.utime(sample_file, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert load_profile(sample_file, cache_dir=cache_dir).offset_of("thing", "v") == 29


def test_a_recent_fingerprint_is_verified_by_content(sample_file, cache_dir, monkeypatch) -> None:
    load_profile(sample_file, cache_dir=cache_dir)  # the file is seconds old: racy
    hashed = []
    real = isf_module._sha256_file
    monkeypatch.setattr(isf_module, "_sha256_file", lambda p: hashed.append(p) or real(p))
    load_profile(sample_file, cache_dir=cache_dir)
    assert hashed == [sample_file.resolve()]


def test_an_unwritable_cache_directory_only_costs_speed(sample_file, tmp_path) -> None:
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    profile = load_profile(sample_file, cache_dir=blocker / "cache")
    assert profile.offset_of("thing", "v") == 28


def test_the_cache_keeps_only_the_most_recently_used_entries(
    tmp_path, cache_dir, monkeypatch
) -> None:
    monkeypatch.setattr(isf_module, "MAX_ENTRIES", 2)
    paths = []
    for i in range(3):
        isf = build_sample()
        isf["symbols"]["extra"] = {"address": i}
        paths.append(write_isf(isf, tmp_path / f"k{i}.json"))
        load_profile(paths[-1], cache_dir=cache_dir)
        time.sleep(0.01)  # distinct mtimes
    assert len(list(cache_dir.glob("*.vmiprof"))) == 2
    assert load_profile(paths[0], cache_dir=cache_dir).symbol_address("extra") == 0


# -- where a profile came from ----------------------------------------------------------


@pytest.fixture
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Private profile folders: the built cache, one user folder, a shipped folder."""
    from vmishell.symbols import locations

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VMISHELL_PROFILE_PATH", str(tmp_path / "mine"))
    monkeypatch.setattr(locations, "shipped_dir", lambda: tmp_path / "shipped")
    return {
        "shipped": tmp_path / "shipped",
        "built": tmp_path / "xdg" / "vmishell" / "built-profiles",
        "user": tmp_path / "mine",
        "file": tmp_path / "elsewhere",
    }


PRODUCER = {"kernel": "linux-image-6.1.0-99-amd64 6.1.999-1", "types_from": "BTF"}


@pytest.mark.parametrize(
    ("origin", "told"),
    [
        ("shipped", "shipped profile linux-9 (made from linux-image-6.1.0-99-amd64 6.1.999-1)"),
        ("built", "profile built from package linux-image-6.1.0-99-amd64 6.1.999-1 ({path})"),
        ("user", "profile linux-9 from a profile folder ({path}), made from linux-image-6.1.0"),
        ("file", "profile linux-9 from a file ({path}), made from linux-image-6.1.0-99-amd64"),
    ],
)
def test_a_profile_says_where_it_came_from_and_what_it_was_made_from(
    places: dict[str, Path], origin: str, told: str
) -> None:
    path = write_isf(build_sample(producer=PRODUCER), places[origin] / "linux-9.json.xz")
    profile = load_profile(path, cache_dir=places["file"] / "cache")
    assert (profile.path, profile.origin) == (path, origin)
    assert profile.made_from == "linux-image-6.1.0-99-amd64 6.1.999-1"
    assert profile.provenance.startswith(told.format(path=path))


def test_a_profile_of_another_tool_names_the_tool(places: dict[str, Path]) -> None:
    isf = build_sample()
    isf["metadata"]["producer"] = {"name": "dwarf2json", "version": "0.8.0"}
    path = write_isf(isf, places["user"] / "vol.json")
    profile = load_profile(path, cache_dir=places["file"] / "cache")
    assert profile.made_from is None
    assert (
        profile.provenance
        == f"profile vol from a profile folder ({path}), made by dwarf2json 0.8.0"
    )


def test_a_profile_built_in_memory_has_no_path() -> None:
    profile = Profile.from_isf(build_sample(), "fresh")
    assert (profile.path, profile.origin) == (None, "memory")
    assert profile.provenance.startswith("profile fresh built in memory")


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"address": -1}, "address -0x1 is not 64-bit"),
        ({"address": 1 << 64}, "is not 64-bit"),
        ({"address": "nowhere"}, "has no valid address"),
        ({"type": {"kind": "base", "name": "int"}}, "has no valid address"),
        ([16], "has no valid address"),
    ],
)
def test_a_bad_symbol_address_is_named(body: object, says: str) -> None:
    from tests.support.isf import tiny_isf

    isf = tiny_isf()
    isf["symbols"]["bad_one"] = body
    with pytest.raises(ProfileError, match=rf"symbol bad_one .*{says}|symbol bad_one {says}"):
        Profile.from_isf(isf, "bad")


def test_symbols_compile_alike_on_the_fast_and_the_careful_path() -> None:
    from tests.support.isf import tiny_isf

    isf = tiny_isf()
    fast = isf_module.compile_isf(isf, "t")
    odd = json.loads(json.dumps(isf))
    first = next(iter(odd["symbols"]))
    odd["symbols"][first]["address"] = str(odd["symbols"][first]["address"])  # takes the slow path
    careful = Profile(isf_module.compile_isf(odd, "t"))
    fast = Profile(fast)
    names = fast.symbol_names()
    assert careful.symbol_names() == names and len(names) > 3
    for sym in names:
        assert careful.symbol_address(sym) == fast.symbol_address(sym)
        assert careful.symbol_type(sym) == fast.symbol_type(sym)
    assert careful.banner == fast.banner
