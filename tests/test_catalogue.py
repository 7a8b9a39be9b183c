"""The torch-free method catalogue (what `leanmim methods` and `pretrain --help` read) matches the method classes."""

import subprocess
import sys

from leanmim import api, catalogue


def test_stored_catalogue_is_current():
    assert catalogue.stored() == catalogue.from_registry(), \
        "src/leanmim/_catalogue_data.py is out of date: run python -m leanmim.catalogue --write"
    assert catalogue.listing() == api.methods()


def test_methods_listing_and_help_do_not_import_torch():
    code = ("import sys; from leanmim.cli import main\n"
            "for argv in (['methods'], ['methods', '--json'], ['pretrain', '--help'], ['finetune', '--help'], ['--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "sys.stderr.write(' '.join(m for m in ('torch', 'lightning', 'timm') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", f"imported {done.stderr}"
    assert "prmim: partial reconstruction" in done.stdout
    assert "--dynamic-weighting" in done.stdout and "ddae True" in done.stdout
    assert "--label-fraction" in done.stdout and "--ema-decay" in done.stdout   # finetune's flags, torch-free
