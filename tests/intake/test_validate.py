"""`i2v-daemon validate PATH…`: the checks of a drop, without queueing anything, through the real command."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import Env, make_image


def test_a_good_pair_is_ok_with_what_intake_would_note(env: Env, tmp_path: Path):
    image = make_image(tmp_path / "cat.png")
    side = tmp_path / "cat.json"
    side.write_text('{"prompt": "a cat", "steps": 2}')
    proc = env.cli("validate", str(image), str(side))
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.splitlines()[0].startswith(f"ok {image} (PNG 96x64")
    assert proc.stdout.splitlines()[1] == f"ok {side}"


def test_files_named_together_are_refused_as_a_drop_of_them_would_be(env: Env, tmp_path: Path):
    png, jpg = make_image(tmp_path / "dup.png"), make_image(tmp_path / "dup.jpg")
    txt, js = tmp_path / "one.txt", tmp_path / "one.json"
    txt.write_text("a dog")
    js.write_text('{"prompt": "a dog"}')
    proc = env.cli("validate", str(png), str(jpg), str(txt), str(js))
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert lines[0] == f"invalid {png}: dup.jpg, dup.png: several images share the name 'dup'; keep one, or rename " \
                       "the others"
    assert lines[2].startswith(f"invalid {txt}: one.json, one.txt: more than one sidecar for 'one'")


def test_a_path_that_is_not_there_and_a_misspelt_key_say_what_to_fix(env: Env, tmp_path: Path):
    side = tmp_path / "cat.json"
    side.write_text('{"prompt": "a cat", "step": 2}')
    proc = env.cli("validate", str(tmp_path / "nothing.png"), str(side))
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [
        f"invalid {tmp_path / 'nothing.png'}: {tmp_path / 'nothing.png'}: no such file",
        f"invalid {side}: cat.json: unknown key 'step' — did you mean 'steps'?",
    ]
    assert not list(env.inbox.iterdir()) and not (env.data / "jobs.db").exists()  # nothing queued, nothing made


def test_a_folder_is_checked_file_by_file_as_intake_would_take_them(env: Env, tmp_path: Path):
    drops = tmp_path / "drops"
    drops.mkdir()
    image = make_image(drops / "cat.png")
    side = drops / "cat.json"
    side.write_text('{"prompt": "a cat", "step": 2}')
    (drops / ".cat.png.part").write_bytes(b"half a file")  # never taken, so never checked
    (drops / "older").mkdir()  # subfolders are not looked into
    proc = env.cli("validate", str(drops))
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [
        f"invalid {side}: cat.json: unknown key 'step' — did you mean 'steps'?",
        f"ok {image} (PNG 96x64)",
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    said = env.cli("validate", str(empty))
    assert said.returncode == 1 and "not an image" not in said.stdout
    assert said.stdout.startswith(f"invalid {empty}: {empty}: a folder with no file in it to check")


def test_a_drop_for_wan_turbo_is_checked_for_the_lora_its_preset_names(env: Env, tmp_path: Path):
    from tests.conftest import write_config

    loras = tmp_path / "loras"
    loras.mkdir()
    turbo = tmp_path / "wan-turbo"  # a folder named as the preset: its default preset
    turbo.mkdir()
    side = turbo / "cat.json"
    side.write_text('{"prompt": "a cat"}')
    proc = env.cli("validate", str(side))
    assert proc.returncode == 1
    assert (f"invalid {side}: cat.json: preset 'wan-turbo' needs a Wan step-distillation LoRA" in proc.stdout
            and "[presets.wan-turbo]" in proc.stdout)
    write_config(env.config, env.data, env.model_dir, lora_dir=str(loras),
                 presets_extra={"wan-turbo": {"lora": "lightx2v.safetensors"}})
    proc = env.cli("validate", str(side))  # the preset's file is looked for as a sidecar's would be
    assert proc.returncode == 1 and "lora 'lightx2v.safetensors': there is no lightx2v.safetensors in" in proc.stdout
    (loras / "lightx2v.safetensors").write_bytes(b"{}")
    assert env.cli("validate", str(side)).returncode == 0
