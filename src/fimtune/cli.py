"""The `fimtune` command line: parses, then calls one function per command.

Heavy imports (torch, transformers, datasets) live inside the command functions, so
`fimtune --help` and `fimtune data build` start fast and never import torch.
A :class:`~fimtune.errors.FimtuneError` becomes one clean line and exit code 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import errno
import functools
import logging
import os
import signal
import sys
import threading
import typing
from pathlib import Path
from typing import Any, Literal

from fimtune import __version__
from fimtune.config import (
    CorpusConfig,
    RunConfig,
    coerce,
    describe,
    field_docs,
    from_dict,
    load_run_config,
    read_yaml,
    yaml_value,
)
from fimtune.errors import ConfigError, DataError, FimtuneError, Terminated

EXIT_USER_ERROR = 2
EXIT_BROKEN_PIPE = 141  # as a shell reports a process ended by SIGPIPE
EXIT_INTERRUPTED = 130  # ... by SIGINT (Ctrl-C)
EXIT_TERMINATED = 143  # ... by SIGTERM
# A full disk, a quota, a file size limit, a read-only file system: the machine's state, not a fault
FULL_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


# --------------------------------------------------------------------------------------
# Flags generated from a config dataclass (help written once, in the dataclass)
# --------------------------------------------------------------------------------------


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one `--field-name` flag per field of ``cls``; defaults stay None (= not given)."""
    group = parser.add_argument_group(f"{cls.__name__} fields (also settable with --config FILE)")
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        flag = "--" + f.name.replace("_", "-")
        help_text = docs.get(f.name, "") + ("" if f.default is None else f" (default: {f.default})")
        if tp is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        args = typing.get_args(tp)
        choices = list(args) if typing.get_origin(tp) is Literal else None
        group.add_argument(
            flag, dest=f.name, default=None, choices=choices, metavar=None if choices else "V", help=help_text
        )


def dataclass_from_args(cls: type, ns: argparse.Namespace, config_path: str | None) -> Any:
    """Build ``cls`` from an optional YAML file, then the flags that were given."""
    data = read_yaml(config_path) if config_path else {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        value = getattr(ns, f.name, None)
        if value is None:
            continue
        if isinstance(value, str) and hints[f.name] not in (str, str | None):
            value = yaml_value(value)
        data[f.name] = coerce(value, hints[f.name], "--" + f.name.replace("_", "-"))
    try:
        return from_dict(cls, data)
    except ConfigError as e:  # the flags were checked above: the error is the file's
        if not config_path:
            raise
        raise ConfigError(f"{config_path}: {e}") from None


# --------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------


def cmd_data_build(ns: argparse.Namespace) -> int:
    from fimtune.corpus.build import build_corpus, format_stats

    cfg: CorpusConfig = dataclass_from_args(CorpusConfig, ns, ns.config)
    if not (ns.sources or ns.package or ns.hf):
        raise FimtuneError("no sources given: name folders, git repos, parquet/jsonl files, --package NAME or --hf ID")
    with _sigterm_as_interrupt():  # a kill removes the clones and the half-written output, as Ctrl-C does
        stats = build_corpus(
            paths=ns.sources,
            packages=ns.package,
            hf=ns.hf,
            cfg=cfg,
            out=Path(ns.out),
            overwrite=ns.overwrite,
            progress=not ns.quiet,
        )
    print(format_stats(stats))
    print(f"wrote {ns.out}")
    return 0


def cmd_data_inspect(ns: argparse.Namespace) -> int:
    from fimtune.preview import inspect_dataset

    if ns.n < 0:
        raise FimtuneError(f"--n must be 0 (the summary alone) or more (got {ns.n})")
    cfg: RunConfig = load_run_config(ns.config, ns.overrides)
    model = ns.model or cfg.model.name_or_path  # the run's tokenizer, as training will use
    print(inspect_dataset(Path(ns.dataset), model=model, n=ns.n, cfg=cfg, split=ns.split))
    return 0


def cmd_train(ns: argparse.Namespace) -> int:
    if ns.stop_after is not None and ns.stop_after < 1:
        raise FimtuneError(f"--stop-after must be a step, 1 or more (got {ns.stop_after})")
    cfg = load_run_config(ns.config, ns.overrides)
    from fimtune.train import describe_plan, preflight

    preflight(cfg)  # what a run would refuse only after loading the model, refused now (--dry-run too)

    from fimtune import checkpoint

    ckpt = checkpoint.latest_checkpoint(Path(cfg.output_dir)) if ns.resume else None
    first = checkpoint.step_of(ckpt) if ckpt else 0
    if ckpt:  # what the run refuses before loading its model, refused now (--dry-run too)
        from fimtune.config import resolved_paths
        from fimtune.train import check_resumed_config, check_same_processes, launched_processes

        check_resumed_config(resolved_paths(cfg), Path(cfg.output_dir))
        meta = checkpoint.load_meta(ckpt)
        if not meta.get("optimizer_sharding"):  # a split optimizer's: the run names its engine too
            check_same_processes(ckpt, meta, launched_processes())
    if ns.stop_after is not None and ns.stop_after <= first:
        raise FimtuneError(f"--stop-after {ns.stop_after}: the run is at step {first} already (its last checkpoint)")
    main_process = _main_process()  # under `accelerate launch`, one plan, not one per process
    if main_process:
        print(describe_plan(cfg, first, ns.stop_after))
        if _launched_alone_on_cpu():
            print(
                "warning: `accelerate launch --cpu` started this process alone, whatever --num_processes says "
                "(Accelerate starts several CPU processes only under mpirun, --mpirun_hostfile): it trains on its "
                "own, with its own batch as the global batch. Several processes on this machine: accelerate launch "
                "--config_file configs/accelerate/cpu-2proc.yaml (or --multi_gpu --num_processes N, without --cpu: "
                "fimtune trains on the CPU where there is no CUDA GPU)",
                file=sys.stderr,
            )
    if ns.dry_run:
        if main_process and cfg.data.path:  # the plan reads no data; the run would refuse a missing folder
            from fimtune.dataset import check_folder

            try:
                check_folder(Path(cfg.data.path))
            except DataError as e:
                print(f"warning: {e}; the run would stop here", file=sys.stderr)
        return 0
    from fimtune.train import exit_launched_process, fit

    with _sigterm_as_interrupt():
        run_dir = fit(cfg, resume=ns.resume, stop_after=ns.stop_after)
    if main_process:
        print(f"run folder: {run_dir}")
    exit_launched_process()  # under `accelerate launch`: ends here
    return 0


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM ends a data build, a training run, an eval, a merge or an export as Ctrl-C does: the
    progress bar closed, the checkpoint it keeps and `--resume` said (an eval: the finished tasks'
    figures kept, and said), a temporary folder or file removed. Python's default ends the process
    on the spot, without a word, and leaves them behind. Checkpoints, merged folders and GGUF files
    are written whole or not at all, so one being written when it comes is simply not there."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmd_eval(ns: argparse.Namespace) -> int:
    from fimtune.evaluate.run import main as evaluate

    with _sigterm_as_interrupt():  # the finished tasks' figures kept, as on Ctrl-C
        return evaluate(ns)


def cmd_complete(ns: argparse.Namespace) -> int:
    from fimtune.generate import main as complete

    return complete(ns)


def cmd_serve(ns: argparse.Namespace) -> int:
    from fimtune.serve.app import main as serve

    return serve(ns)


def cmd_merge(ns: argparse.Namespace) -> int:
    from fimtune.merge import merge_run

    with _sigterm_as_interrupt():  # a kill mid-write removes the temporary folder, as Ctrl-C does
        out = merge_run(Path(ns.run), Path(ns.out), dtype=ns.dtype, overwrite=ns.overwrite)
    print(f"merged model written to {out} (loads with AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_export(ns: argparse.Namespace) -> int:
    from fimtune.export import export_gguf

    with _sigterm_as_interrupt():  # a kill mid-write removes the temporary file, as Ctrl-C does
        out = export_gguf(Path(ns.run), Path(ns.out), dtype=ns.dtype, overwrite=ns.overwrite, progress=not ns.quiet)
    print(f"GGUF model written to {out} (llama.cpp: llama-server -m {out})")
    return 0


def cmd_config(ns: argparse.Namespace) -> int:
    if ns.markdown:
        from fimtune.config import reference_markdown

        print(reference_markdown(), end="")
        return 0
    if ns.config or ns.overrides:
        import yaml

        from fimtune.config import to_dict

        cfg = load_run_config(ns.config, ns.overrides)
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    for key, tp, default, doc in describe(RunConfig):
        print(f"{key:40s} {tp:28s} {default:14s} {doc}")
    return 0


# --------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------


class _DefaultsFormatter(argparse.HelpFormatter):
    """Help that gives each option's default, where it has one its text does not already give."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        if default is None or default is False or default in ([], "", argparse.SUPPRESS) or "default" in text:
            return text
        return f"{text} (default: %(default)s)" if action.option_strings else text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fimtune",
        description="Turn your own code into your own fill-in-the-middle code copilot.",
    )
    parser.add_argument("--version", action="version", version=f"fimtune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    commands = functools.partial(argparse.ArgumentParser, formatter_class=_DefaultsFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=commands)
    # `--debug` is accepted after the subcommand too; SUPPRESS keeps the top-level value.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    data = sub.add_parser("data", help="build and inspect training corpora")
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", parser_class=commands)

    build = data_sub.add_parser(
        "build",
        parents=[common],
        help="turn folders, git repos, packages, Hub datasets, parquet/jsonl into a dataset",
        description="Build a train/validation dataset (datasets.save_to_disk) plus stats.json from code sources.",
    )
    build.add_argument("sources", nargs="*", help="folders, git repos (path or URL), .parquet/.jsonl/.json files")
    build.add_argument(
        "--package",
        action="append",
        default=[],
        metavar="NAME",
        help="an installed Python distribution's source (repeatable)",
    )
    build.add_argument(
        "--hf", action="append", default=[], metavar="ID", help="a Hub dataset id (repeatable); needs network"
    )
    build.add_argument("--out", required=True, help="output folder (written atomically)")
    build.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    build.add_argument("--config", help="a YAML file of CorpusConfig fields")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    add_dataclass_flags(build, CorpusConfig)
    build.set_defaults(func=cmd_data_build)

    inspect = data_sub.add_parser(
        "inspect",
        parents=[common],
        help="show packed FIM samples of a dataset, decoded",
        description="Tokenize a dataset, apply FIM and packing as training will, and print samples.",
    )
    inspect.add_argument("dataset", help="a folder written by `fimtune data build`")
    inspect.add_argument(
        "--model",
        help="model whose tokenizer to use (default: the run config's model.name_or_path, `embedded`: SmolLM2-135M)",
    )
    inspect.add_argument("--n", type=int, default=3, help="packed samples to print")
    inspect.add_argument("--split", default="train", help="split to inspect")
    inspect.add_argument("--config", help="a run config or a preset's name (its model, fim, packing and seed apply)")
    inspect.add_argument("overrides", nargs="*", help="key=value overrides, e.g. fim.spm_rate=1.0")
    inspect.set_defaults(func=cmd_data_inspect)

    train = sub.add_parser(
        "train",
        parents=[common],
        help="LoRA + FIM fine-tuning into a run folder",
        description="Fine-tune a causal LM with LoRA and FIM. Fields: `fimtune config`.",
    )
    train.add_argument("--config", help="a YAML run config, or a preset's name (configs/NAME.yaml)")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=10 output_dir=runs/x")
    train.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last checkpoint")
    train.add_argument("--dry-run", action="store_true", help="print the plan and exit (no weights, no data)")
    train.add_argument(
        "--stop-after", type=int, metavar="STEP", help="stop after this step with a checkpoint; --resume continues"
    )
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser(
        "eval",
        parents=[common],
        help="base vs tuned: held-out loss, infill exact match, HumanEval",
        description="Compare a run's tuned model with its base (adapters disabled) on the same data.",
    )
    ev.add_argument("run", help="a run folder written by `fimtune train`")
    ev.add_argument("--tasks", default="loss,infill,humaneval", help="comma-separated: loss, infill, humaneval")
    ev.add_argument("--limit", type=int, help="at most this many HumanEval problems and loss rows per format")
    ev.add_argument("--holes", type=int, default=200, help="infill holes cut in held-out files")
    ev.add_argument("--batch-size", type=int, default=16, help="generation batch size")
    ev.add_argument("--samples", type=int, default=1, help="HumanEval samples per problem (pass@k for k <= samples)")
    ev.add_argument("--out", help="report folder (default: RUN/eval)")
    ev.set_defaults(func=cmd_eval)

    comp = sub.add_parser(
        "complete",
        parents=[common],
        help="one fill-in-the-middle completion in the terminal",
        description="Complete the code between a prefix and a suffix with a run folder or a base model.",
    )
    comp.add_argument("target", help="a run folder, or a base model (`embedded`, Hub id, folder, .gguf)")
    src = comp.add_mutually_exclusive_group(required=True)
    src.add_argument("--prefix", help="the code before the cursor")
    src.add_argument("--prefix-file", help="a file holding the code before the cursor (-: the standard input)")
    src.add_argument(
        "--at",
        metavar="FILE:LINE[:COL]",
        help="a cursor in a file: the code before it is the prefix, the code after it the suffix "
        "(LINE and COL count from 1, COL in characters: a tab is one; without COL, the cursor is at the "
        "start of LINE)",
    )
    suf = comp.add_mutually_exclusive_group()
    suf.add_argument("--suffix", default="", help="the code after the cursor")
    suf.add_argument("--suffix-file", help="a file holding the code after the cursor (-: the standard input)")
    comp.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most")
    comp.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    comp.add_argument(
        "--top-p", type=float, default=0.95, help="sample among the likeliest tokens of this total probability"
    )
    comp.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: off)")
    comp.add_argument("--seed", type=int, help="sampling seed: the same completion each time (default: random)")
    comp.add_argument("--max-input-tokens", type=int, default=2048, help="fit the prompt to this many tokens")
    comp.add_argument(
        "--mode",
        choices=["auto", "psm", "spm"],
        default="auto",
        help="prompt layout (auto: SPM if the run trained on it)",
    )
    comp.add_argument("--single-line", action="store_true", help="stop at the first newline")
    comp.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    comp.add_argument(
        "--compare-base", action="store_true", help="also print the base model's completion (run folders)"
    )
    comp.set_defaults(func=cmd_complete)

    srv = sub.add_parser(
        "serve",
        parents=[common],
        help="serve completions to editors over HTTP (TGI, OpenAI and llama.cpp /infill shapes)",
        description="Serve a run folder (or a base model) to editors.",
    )
    srv.add_argument("target", help="a run folder, or a base model (`embedded`, Hub id, folder, .gguf)")
    srv.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="another run's adapter")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    srv.add_argument("--port", type=int, default=8080, help="port to listen on")
    srv.add_argument(
        "--api-key",
        default=os.environ.get("FIMTUNE_API_KEY"),
        help="require `Authorization: Bearer KEY` on every route but /health (default: $FIMTUNE_API_KEY, "
        "which keeps the key out of the process list)",
    )
    srv.add_argument(
        "--mode",
        choices=["auto", "psm", "spm"],
        default="auto",
        help="prompt layout (auto: SPM if the run trained on it)",
    )
    srv.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16"],
        help="weights dtype (default: a run's model.dtype; for `auto` and base models bf16 or fp16 on GPUs, fp32 on CPU)",
    )
    srv.add_argument("--quantize", choices=["int8"], help="CPU: int8 weights, ~2x faster tokens (one model only)")
    srv.add_argument("--threads", type=int, help="CPU threads for generation (default: torch's choice)")
    srv.add_argument(
        "--engine-process",
        action="store_true",
        help="run the model in a process of its own, so that its worker shares the interpreter lock with "
        "nothing else (default: a thread of the server's process)",
    )
    srv.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="GPU: decode eagerly (default: static KV cache + compiled steps replayed as CUDA graphs)",
    )
    srv.add_argument(
        "--continuous-batching",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="GPU: waiting requests join the batch in flight (the default; --no-continuous-batching: "
        "a batch runs to its end before the next starts)",
    )
    srv.add_argument(
        "--overlap-joins",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="GPU, continuous batching: prefill a prompt that waits alone on a stream of its own beside the "
        "batch's decoding steps (the default; prompts that wait together join together; "
        "--no-overlap-joins: the batch waits for every join's prefill)",
    )
    srv.add_argument(
        "--no-prefill-graphs",
        action="store_true",
        help="GPU: prefill single prompts eagerly (default: padded to a length bucket, replayed as a CUDA graph)",
    )
    srv.add_argument(
        "--no-gemv-steps",
        action="store_true",
        help="GPU: a batch of one's decoding step multiplies through cuBLAS (default: compiled matrix-vector kernels)",
    )
    srv.add_argument(
        "--switch-interval-ms",
        type=float,
        help="while serving, how long another thread may keep the interpreter lock from the model's "
        "worker (Python's switch interval; default 0.5, Python's own 5)",
    )
    srv.add_argument(
        "--decode-attention",
        choices=["auto", "sdpa", "grouped", "matmul", "flex"],
        help="GPU: the decoding steps' attention: SDPA, SDPA with the query heads of a key/value head folded, "
        "two matrix products, or FlexAttention (default auto: the fastest of the first three on each batch "
        "size, timed at start-up)",
    )
    lim = srv.add_argument_group("limits (shown in GET /info)")
    lim.add_argument("--max-input-tokens", type=int, help="prompt tokens; FIM prompts are fitted (default 2048)")
    lim.add_argument("--max-new-tokens", type=int, help="new tokens a request may ask for (default 256)")
    lim.add_argument("--max-body-bytes", type=int, help="request body size (default 1000000)")
    lim.add_argument("--timeout", type=float, help="seconds a request may take, queue included (default 60)")
    lim.add_argument("--queue-size", type=int, help="requests waiting before 503 + Retry-After (default 32)")
    lim.add_argument("--max-batch-size", type=int, help="requests generated together (default 8)")
    lim.add_argument("--batch-wait-ms", type=float, help="a batch starts this long after its first request (default 2)")
    lim.add_argument(
        "--batch-max-wait-ms",
        type=float,
        help="> 0: instead, once requests stopped arriving for --batch-wait-ms (none is being tokenized), "
        "at most this long after the first (default 0: off)",
    )
    lim.add_argument(
        "--join-min-rows", type=int, help="GPU, --continuous-batching: rows join once this many wait (default 1)"
    )
    lim.add_argument(
        "--join-wait-ms",
        type=float,
        help="GPU, --continuous-batching: ... or once the first waited this long (default 0)",
    )
    srv.set_defaults(func=cmd_serve)

    merge = sub.add_parser(
        "merge",
        parents=[common],
        help="merge a run's LoRA adapter into its base: a plain transformers model",
        description="Write a standalone model (weights with LoRA merged, FIM tokens, tokenizer) to --out.",
    )
    merge.add_argument("run", help="a run folder written by `fimtune train`")
    merge.add_argument("--out", required=True, help="output folder (written atomically)")
    merge.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    merge.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16", "auto"],
        help="dtype of the saved weights, merged in fp32 (default: the run's model.dtype; auto: the base model's)",
    )
    merge.set_defaults(func=cmd_merge)

    export = sub.add_parser(
        "export",
        parents=[common],
        help="write a run (or a merged model) as one GGUF file for llama.cpp, llama.vim, Ollama",
        description="Merge a run's LoRA adapter (as `fimtune merge`) and write one .gguf file: Llama-architecture "
        "weights, the byte-level BPE tokenizer, and the FIM token ids llama.cpp's /infill reads.",
    )
    export.add_argument("run", help="a run folder written by `fimtune train`, or a folder `fimtune merge` wrote")
    export.add_argument("--out", required=True, help="the .gguf file to write (written atomically)")
    export.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    export.add_argument(
        "--dtype",
        choices=["f32", "f16", "bf16", "q8_0"],
        default="f16",
        help="weights type (norms and other 1-D tensors stay f32)",
    )
    export.add_argument("--quiet", action="store_true", help="no progress bars")
    export.set_defaults(func=cmd_export)

    config = sub.add_parser("config", parents=[common], help="list config fields, or print a resolved config")
    config.add_argument("--config", help="a YAML run config, or a preset's name, to resolve")
    config.add_argument("--markdown", action="store_true", help="the field reference as Markdown (the README's)")
    config.add_argument("overrides", nargs="*", help="key=value overrides")
    config.set_defaults(func=cmd_config)
    return parser


def _command_parser(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub)command ``ns`` ran, so that its errors show that command's usage."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            name = getattr(ns, action.dest, None)
            if name in action.choices:
                return _command_parser(action.choices[name], ns)
    return parser


def _unrecognized(parser: argparse.ArgumentParser, ns: argparse.Namespace, extra: list[str]) -> typing.NoReturn:
    """Stop on arguments no command takes, naming the flag or `key=value` override that was likely meant."""
    command = _command_parser(parser, ns)
    message = f"unrecognized arguments: {' '.join(extra)}"
    flag = next((e.split("=")[0] for e in extra if e.startswith("--")), None)
    if flag:
        flags = [o for a in command._actions for o in a.option_strings if o.startswith("--")]
        keys = [key for key, *_ in describe(RunConfig)] if hasattr(ns, "overrides") else []
        name = flag[2:].replace("-", "_")
        fields = [k for k in keys if k.rsplit(".", 1)[-1] == name]
        if close := difflib.get_close_matches(flag, flags, n=1):
            message += f" (did you mean {close[0]}?)"
        elif fields:
            message += f" (config fields are key=value overrides: {fields[0]}=...)"
    command.error(message)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
    return f"warning: {message}\n"


class _Stderr(logging.Handler):
    """fimtune's log records, a line each, on whatever `sys.stderr` is when they come."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - logging's own rule: a record that fails is reported, never raised
            self.handleError(record)


def _show_logs() -> None:
    """Show fimtune's notes (INFO: a GGUF model dequantized once, the fast paths a run takes, CUDA
    graphs ready) besides its warnings; Python shows only warnings of a logger left unconfigured.
    Under a launcher of several processes, the first one's notes alone."""
    logger = logging.getLogger("fimtune")
    if any(isinstance(h, _Stderr) for h in logger.handlers):
        return
    logger.addHandler(_Stderr())
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO if _main_process() else logging.WARNING)


def _launched_alone_on_cpu() -> bool:
    """Whether `accelerate launch --cpu` was asked for several processes (--num_processes or --num_machines
    above 1: it then sets MASTER_ADDR) and started this one alone, as it does without mpirun."""
    from fimtune.train import WORLD_SIZE_VARIABLES

    on_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return on_cpu and "MASTER_ADDR" in os.environ and not any(v in os.environ for v in WORLD_SIZE_VARIABLES)


def _main_process() -> bool:
    """Whether this is the first process of a launcher's (`accelerate launch`, torchrun), or runs alone."""
    return os.environ.get("RANK", "0") == "0"


def main(argv: list[str] | None = None) -> int:
    import warnings

    _show_logs()
    warnings.formatwarning = _one_line_warning
    # Library deprecation notices are for us, not for the person running a command.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*deprecated.*")
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    # `key=value` overrides may follow options (`inspect DIR --n 1 fim.spm_rate=1`): argparse
    # fills a positional list only once, so collect the stragglers here.
    if extra:
        if hasattr(ns, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            ns.overrides = [*ns.overrides, *extra]
        else:
            _unrecognized(parser, ns, extra)
    if not getattr(ns, "func", None):  # no command, or a group without its subcommand: a usage error
        _command_parser(parser, ns).print_help()
        return EXIT_USER_ERROR
    try:
        code = ns.func(ns)
        sys.stdout.flush()  # here, where a reader that left (`fimtune config | head`) can be told apart
        return code
    except BrokenPipeError:
        # The reader of the output closed it: nothing more to say, and no traceback at exit's flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except FimtuneError as e:
        if ns.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as e:
        if ns.debug or e.errno not in FULL_DISK_ERRNOS:
            raise
        print(f"error: a write failed: {e}; free space (or write elsewhere) and run again", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as e:
        said = "terminated" if isinstance(e, Terminated) else "interrupted"
        if _main_process():  # a launcher stops every process (Ctrl-C, SIGTERM): the first one says it
            print(f"{said}: {e}" if str(e) else said, file=sys.stderr)
        return EXIT_TERMINATED if isinstance(e, Terminated) else EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
