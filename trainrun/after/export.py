"""A run's checkpoint as a Hugging Face folder of its model family's format
(trainrun.models: each family's adapter), which `trainrun-export` writes
(trainrun.commands.export).

The folder gets config.json and model.safetensors (the family's adapter,
trainrun/models/*_hf.py: its names and config, fp32), generation_config.json, and the
tokenizer's files (its own `save`), so that `AutoModelForCausalLM.from_pretrained(OUT)` and
`AutoTokenizer.from_pretrained(OUT)` give the model's logits and the run's token ids. It is
written beside OUT and renamed into place when complete. No `transformers` is needed to
export.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

from trainrun.after.run import Run
from trainrun.data import Tokenizer
from trainrun.data.tokenizers import JSONTokenizer
from trainrun.errors import ConfigError
from trainrun.resume import quote


def write_folder(run: Run, out: Path) -> list[str]:
    """Write run's model and tokenizer into the folder `out` (absent, or an empty folder);
    return the names of the files written."""
    adapter = run.cfg.model.hf
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    try:
        files = adapter.write(run.model, tmp, run.tokenizer.eot)
        generation = {"bos_token_id": run.tokenizer.eot, "eos_token_id": run.tokenizer.eot}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        files += ["generation_config.json",
                  *run.tokenizer.save(tmp, run.cfg.model.max_seq_len)]
        umask = os.umask(0)
        os.umask(umask)
        for name in files:  # safetensors writes its file for its owner only
            os.chmod(tmp / name, 0o666 & ~umask)
        os.chmod(tmp, 0o777 & ~umask)
        if out.exists():
            out.rmdir()  # empty, checked before
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files


def start_command(out: Path, tokenizer: Tokenizer, seq_len: int) -> str:
    """The `trainrun` command that starts a run from the export: model.init_from takes the
    shape from its config.json; a tokenizer other than the byte one is the export's own
    tokenizer.json (tokenizer=hf), its end of document named where the tokenizer would not
    find it by itself; data.seq_len the run's, which the model's positions hold."""
    words = [f"model.init_from={quote(str(out))}"]
    if isinstance(tokenizer, JSONTokenizer):
        words += ["tokenizer=hf", f"tokenizer.path={quote(str(out))}"]
        try:
            found = JSONTokenizer(tokenizer.tok, None, str(out)).eot  # tokenizer.eot=null's
        except ConfigError:  # none of the usual names
            found = None
        if found != tokenizer.eot:
            words.append(f"tokenizer.eot={quote(tokenizer.eot_text)}")
    words.append(f"data.seq_len={seq_len}")
    return " ".join(["trainrun", *map(shlex.quote, words)])
