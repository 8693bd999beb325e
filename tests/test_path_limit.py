import sys
from pathlib import Path

from nucleiseg_monai.atomic import host_name
from nucleiseg_monai.path_limit import path_too_long, written_paths


def _longest(output_dir: Path, name: str) -> str:
    """The longest path a run writes for ``name``: a kept region's temporary file, its indices at 5 digits, its
    writer's process id at 7 and mkstemp's 8 random characters."""
    return (f"{output_dir}/.{name}.regions/{'0' * 16}/.r99999-99999.npy.z.pid9999999@{host_name()}-xxxxxxxx"
            ".tmp.z")


def test_a_name_whose_longest_path_has_259_characters_passes_and_one_more_is_refused(tmp_path, windows):
    name = "S" * (259 - len(_longest(tmp_path, "")))
    assert len(_longest(tmp_path, name)) == 259
    assert max(map(str, written_paths(tmp_path, name)), key=len) == _longest(tmp_path, name)
    assert path_too_long(tmp_path, name) is None
    assert path_too_long(tmp_path, name + "S") == (
        f"output name '{name}S' needs paths of up to 260 characters in {tmp_path} (its outputs, their temporary "
        "files and its kept regions), 1 more than the 259 Windows takes where long paths are not enabled, as here: "
        "choose a shorter output folder, give the image a shorter name (the 'slide' column of a slide list), or "
        "enable long paths (the LongPathsEnabled registry value, as Microsoft's page \"Maximum Path Length "
        "Limitation\" describes)")
    # Windows counts UTF-16 units: a character beyond the Basic Multilingual Plane takes two
    assert "up to 260 characters" in path_too_long(tmp_path, name[:-1] + "\N{MICROSCOPE}")
    assert "up to 263 characters" in path_too_long(tmp_path / "out", name)


def test_a_relative_output_folder_counts_as_the_absolute_path_windows_makes_of_it(tmp_path, windows, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = "S" * (259 - len(_longest(tmp_path / "out", "")))
    assert path_too_long("out", name) is None
    assert f"up to 260 characters in {tmp_path / 'out'} " in path_too_long("out", name + "S")


def test_with_long_paths_enabled_any_length_passes_and_an_unreadable_setting_counts_as_not_enabled(tmp_path,
                                                                                                   windows):
    name = "S" * 300
    windows.values["LongPathsEnabled"] = 1
    assert path_too_long(tmp_path, name) is None
    for values in ({"LongPathsEnabled": 0}, {}, None):  # 0, no value, a key that cannot be opened
        windows.values = values
        assert "up to " in path_too_long(tmp_path, name)


def test_elsewhere_nothing_is_checked_and_no_registry_is_asked(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "winreg", None)  # importing it would raise
    assert sys.platform != "win32" and path_too_long(tmp_path, "S" * 300) is None
