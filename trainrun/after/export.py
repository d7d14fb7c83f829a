"""`trainrun-export RUN_DIR OUT`: a run's checkpoint as a Hugging Face folder of its model
family's format (trainrun.models: each family's adapter).

OUT gets config.json and model.safetensors (the family's adapter, trainrun/models/*_hf.py:
its names and config, fp32), generation_config.json, and the tokenizer's files (its own `save`), so that
`AutoModelForCausalLM.from_pretrained(OUT)` and `AutoTokenizer.from_pretrained(OUT)` give
the model's logits and the run's token ids. The folder is written beside OUT and renamed
into place when complete; OUT must not exist, or be an empty folder. No `transformers` is
needed to export.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
from collections.abc import Sequence
from pathlib import Path

from trainrun.after.output import Messages, Parser, run_command
from trainrun.after.run import ARG, arguments, open_run
from trainrun.data import Tokenizer
from trainrun.data.tokenizers import JSONTokenizer
from trainrun.errors import ConfigError
from trainrun.models import formats
from trainrun.resume import quote

PROG = "trainrun-export"


def parser() -> Parser:
    p = Parser(prog=PROG, description="Write a run's newest intact checkpoint (or --checkpoint) "
                                      f"as a Hugging Face folder of its model family's format "
                                      f"({formats()}) with its tokenizer.")
    arguments(p)
    p.add_argument("out", metavar="OUT", help="the folder to write (new, or empty)")
    return p


def check_out(out: Path) -> None:
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ConfigError("OUT", f"{out} already exists; allowed: a new or empty folder")
    parent = out.resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ConfigError("OUT", f"{out}: cannot write in {parent}; allowed: a folder in a "
                                 f"writable directory")


def export(args: argparse.Namespace, _: list[str]) -> None:
    out = Path(args.out).expanduser()
    check_out(out)
    run = open_run(args.run_dir, ["trainer.device=cpu"], args.checkpoint, data=False,
                   config_dir=args.config_dir)
    adapter = run.cfg.model.hf
    if adapter is None:
        raise ConfigError(ARG, f"{args.run_dir} holds a model of family {run.cfg.model.family}, "
                               f"which has no Hugging Face format; allowed: a run of a family "
                               f"that has one ({formats()})")
    messages = Messages()
    for warning in run.warnings:
        messages.warning(warning)
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
            out.rmdir()  # empty, checked above
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    messages.info(f"{run.checkpoint} (update {run.step}): {run.model.num_params():,} parameters")
    print(f"wrote {out}: {', '.join(sorted(files))}")
    print(f"load it with AutoModelForCausalLM.from_pretrained({str(out)!r}) and "
          f"AutoTokenizer.from_pretrained({str(out)!r}), or start a run from it with "
          f"{start_command(out, run.tokenizer, run.cfg.data.seq_len)}", flush=True)


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


def main(argv: Sequence[str] | None = None) -> None:
    run_command(PROG, argv, parser(), export)


if __name__ == "__main__":
    main()
