"""The README's pretrained-model commands run as written (slow: four short `jaxlab train` runs)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTION = re.search(r"\n## Pretrained models.*?\n## Results", (ROOT / "README.md").read_text(), flags=re.S).group(0)


def _commands() -> list[str]:
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", SECTION, flags=re.S):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line and "/ckpt/" not in line:  # the pod example names a checkpoint this machine lacks
                cmds.append(line)
    return cmds


def test_readme_lists_the_workflows():
    cmds = _commands()
    assert len(cmds) == 4 and all(c.startswith("jaxlab train configs/hf/") for c in cmds)


@pytest.mark.slow
def test_readme_pretrained_commands_run_as_written(tmp_path):
    for d in ("configs", "tests"):
        (tmp_path / d).symlink_to(ROOT / d)
    exe = str(Path(sys.executable).parent / "jaxlab")
    for cmd in _commands():
        args = shlex.split(cmd)
        subprocess.run([exe, *args[1:], "--set", "train.progress=false"], cwd=tmp_path, check=True)
    runs = tmp_path / "runs"
    for name in ("naive_lora", "hf_grasp_sft", "hf_step_2of4", "hf_sr_ste_2of4"):
        assert (runs / name / "hf" / "config.json").exists(), name
    assert (runs / "hf_grasp_sft" / "grasp_U.npy").exists()
    assert (runs / "hf_step_2of4" / "hf" / "nm_compressed.safetensors").exists()
